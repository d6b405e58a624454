"""train.loggers: TensorBoard, W&B and MLflow get what metrics.jsonl gets, read back with each tool's own reader,
continue their runs on --resume, and never change or stop a run when they fail."""

from __future__ import annotations

import json
import os
import signal
import struct
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import CONFIGS, FIXTURES, VERDICT, final_weights, run_losses
from gptcli import loggers
from gptcli.config import load_config
from gptcli.loggers import flatten, params
from gptcli.train import Events, train

# tiny.yaml at batch 16: 9 steps per epoch; 2 epochs capped at 12 steps gives an epoch sample (step 9), evaluations at
# steps 1, 4, 7, 10 and the final one at 12, and a stop at step 5 that is neither.
OVERRIDES = {"train.batch_size": 16, "train.num_epochs": 2, "train.max_steps": 12, "train.eval_freq": 3, "train.save_freq": None,
             "train.peak_flops": 1e12}
STOP_AT = 5


class _Recorder(Events):
    """Keeps the warnings; sends SIGINT once `stop_at` is logged (the loop saves and raises Interrupted)."""

    def __init__(self, stop_at: int | None = None):
        self.warnings: list[str] = []
        self.stop_at = stop_at

    def warn(self, message):
        self.warnings.append(message)

    def log(self, record):
        if record["step"] == self.stop_at:
            os.kill(os.getpid(), signal.SIGINT)


def _config(verdict, **extra):
    return load_config(CONFIGS / "tiny.yaml", {"data.path": str(verdict), "train.device": "cpu", **OVERRIDES, **extra})


@pytest.fixture(scope="module")
def tracker_env(tmp_path_factory):
    """No W&B credentials anywhere, though online is asked for (it must go offline, not prompt), no MLflow
    server, tool caches in tmp."""
    home = tmp_path_factory.mktemp("tracker-home")
    (home / "netrc").write_text("")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "online")
        for name in ("WANDB_API_KEY", "WANDB_PROJECT", "WANDB_BASE_URL", "WANDB_IDENTITY_TOKEN_FILE",
                     "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
            mp.delenv(name, raising=False)
        mp.setenv("NETRC", str(home / "netrc"))
        for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
            mp.setenv(name, str(home / name.lower()))
        yield


@pytest.fixture(scope="module")
def resumed_run(tracker_env, tmp_path_factory) -> tuple[Path, list[str]]:
    """All three trackers on a run stopped by SIGINT at step 5 and resumed to its end (12 steps)."""
    run = tmp_path_factory.mktemp("tracked") / "run"
    cfg = _config(VERDICT, **{"train.loggers": ["tensorboard", "wandb", "mlflow"]})
    first = _Recorder(stop_at=STOP_AT)
    with pytest.raises(Exception) as stopped:
        train(cfg, run, events=first)
    assert type(stopped.value).__name__ == "Interrupted"
    second = _Recorder()
    train(cfg, run, resume=True, events=second)
    return run, first.warnings + second.warnings


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _expected(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Every metric of metrics.jsonl as tag -> [(step, value)], in the loggers' names."""
    out: dict[str, list[tuple[int, float]]] = {}
    for record in _records(run):
        for key, value in flatten(record).items():
            out.setdefault(key, []).append((record["step"], value))
    return out


def test_metric_names_flatten_records_by_event_and_nested_key():
    record = {"event": "eval", "step": 3, "val_loss": 2.5, "final": True, "lr": None, "grad_norm": 1,
              "val_loss_by_source": {"web": 2.0, "code": 3.0}}
    assert flatten(record) == {"eval/val_loss": 2.5, "eval/grad_norm": 1.0,
                               "eval/val_loss_by_source/web": 2.0, "eval/val_loss_by_source/code": 3.0}


def test_train_loggers_refuses_an_unknown_or_repeated_tracker_by_key(verdict):
    from gptcli.config import ConfigError

    for bad in (["comet"], "tensorboard", ["wandb", "wandb"]):
        with pytest.raises(ConfigError, match="train.loggers"):
            _config(verdict, **{"train.loggers": bad})
    with pytest.raises(ConfigError, match="train.logger_timeout"):
        _config(verdict, **{"train.logger_timeout": 0})


def test_tensorboard_scalars_equal_metrics_jsonl_step_by_step_across_a_resume(resumed_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _ = resumed_run
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    expected = _expected(run)
    assert set(acc.Tags()["scalars"]) == set(expected)
    for tag, points in expected.items():
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in points], tag  # one point per step: none lost, none twice
        # TensorBoard stores scalars as float32: equal to a float32 rounding of the record
        assert [v for _, v in got] == pytest.approx([v for _, v in points], rel=1e-6), tag
    assert [e.step for e in acc.Images("losses")] == [r["step"] for r in _records(run) if r["event"] == "eval"]
    assert "samples/text_summary" in acc.Tags()["tensors"] and "config/text_summary" in acc.Tags()["tensors"]


def test_mlflow_params_and_metric_history_equal_the_run_across_a_resume(resumed_run):
    from mlflow.tracking import MlflowClient

    run, warnings = resumed_run
    state = json.loads((run / loggers.STATE_FILE).read_text())["mlflow"]
    client = MlflowClient(tracking_uri=state["tracking_uri"])
    assert state["tracking_uri"].startswith("sqlite:///") and str(run / "mlflow") in state["tracking_uri"]
    assert [r.info.run_id for r in client.search_runs([client.get_experiment_by_name("gptcli").experiment_id])] == [
        state["run_id"]]  # the resume continued the run, it did not start another
    assert client.get_run(state["run_id"]).info.status == "FINISHED"  # killed at the SIGINT, running again, done
    data = client.get_run(state["run_id"]).data
    cfg = _config(VERDICT, **{"train.loggers": ["tensorboard", "wandb", "mlflow"]})  # the run's config
    manifest_at_start = {**json.loads((run / "run.json").read_text()), "resumes": []}  # run.json of the first session
    want = {k: str(v) for k, v in params(cfg.to_dict(), manifest_at_start).items()}
    assert {k: data.params[k] for k in want} == want
    for tag, points in _expected(run).items():
        history = sorted((m.step, m.value) for m in client.get_metric_history(state["run_id"], tag))
        assert history == points, tag  # MLflow keeps float64: exactly the record's values
    assert any("mlflow" in w and state["run_id"] in w for w in warnings)  # says where the run went


def _wandb_records(path: Path):
    """The records of a .wandb file, read with W&B's own protobuf schema (wandb.proto.wandb_internal_pb2.Record).

    wandb 0.31 ships no Python reader for its transaction log (its Go core reads it), so the framing is read
    here: the LevelDB log format that W&B's `datastore.py` documented: a 7-byte file header (":W&B", 0xBEE1,
    version), then 32 KiB blocks of records, each with a 7-byte header (crc32, length, type FULL/FIRST/MIDDLE/LAST).
    """
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    assert struct.unpack("<4sHB", data[:7])[:2] == (b":W&B", 0xBEE1)
    pos, block, parts = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if kind == 0:  # the zero padding at a block's end
            pos += left - 7
            continue
        parts += data[pos:pos + length]
        pos += length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = Record()
            record.ParseFromString(parts)
            yield record
            parts = b""


def test_wandb_offline_history_equals_metrics_jsonl_in_one_run_across_a_resume(resumed_run):
    run, warnings = resumed_run
    run_id = json.loads((run / loggers.STATE_FILE).read_text())["wandb"]["run_id"]
    sessions = sorted((run / "wandb").glob("offline-run-*"))
    assert len(sessions) == 2 and all(s.name.endswith(run_id) for s in sessions)  # one W&B run, two sessions
    history: dict[str, list[tuple[int, float]]] = {}
    config, media = {}, {}
    for session in sessions:
        for record in _wandb_records(session / f"run-{run_id}.wandb"):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                assert record.run.run_id == run_id
            elif kind == "config":
                config.update({u.key: json.loads(u.value_json) for u in record.config.update})
            elif kind == "history":
                row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item}
                for key, value in row.items():
                    if key.startswith(("train/", "eval/")):
                        history.setdefault(key, []).append((row["_step"], value))
                    elif key.endswith("/_type"):  # a logged medium: the plot (image) or a sample (html)
                        media.setdefault(key, []).append(row["_step"])
    assert history == _expected(run)  # JSON keeps float64: exactly the record's values, each step once
    assert media == {"losses/_type": [r["step"] for r in _records(run) if r["event"] == "eval"],
                     "samples/_type": [9]}  # the plot at each evaluation, the sample where epoch 1 ended
    assert config["model.emb_dim"] == 32 and config["train.loggers"] == '["tensorboard", "wandb", "mlflow"]'
    hint = [w for w in warnings if "wandb sync" in w]
    assert len(hint) == 2 and "offline" in hint[0]  # said at each session how to upload


# ---------------------------------------------------------------- faults


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same run without loggers."""
    run = tmp_path_factory.mktemp("reference") / "run"
    train(_config(VERDICT), run)
    return run


def _assert_same_run(run: Path, reference: Path) -> None:
    assert run_losses(run) == run_losses(reference)
    ours, theirs = final_weights(run), final_weights(reference)
    assert [k for k in ours if not torch.equal(ours[k], theirs[k])] == []


def _faulty(monkeypatch, tmp_path, fault: str) -> Path:
    """The tracker process runs tests/fixtures/tracker_faults.py with `fault`; returns its calls file."""
    calls = tmp_path / "tracker-calls.txt"
    calls.touch()
    monkeypatch.setattr(loggers, "CHILD", [sys.executable, str(FIXTURES / "tracker_faults.py"), fault, str(calls)])
    return calls


def test_a_logger_that_raises_on_every_call_is_dropped_with_one_warning(verdict, tmp_path, reference, monkeypatch):
    calls = _faulty(monkeypatch, tmp_path, "raising")
    events = _Recorder()
    train(_config(verdict, **{"train.loggers": ["tensorboard"]}), tmp_path / "run", events=events)
    assert len(events.warnings) == 1 and "tensorboard" in events.warnings[0]
    assert "No space left on device" in events.warnings[0] and "training goes on" in events.warnings[0]
    assert calls.read_text().splitlines() == ["params"]  # dropped at its first failure: never called again
    _assert_same_run(tmp_path / "run", reference)


def test_a_logger_that_hangs_is_dropped_after_the_timeout_and_never_blocks_the_run(verdict, tmp_path, reference,
                                                                                   monkeypatch):
    _faulty(monkeypatch, tmp_path, "hanging")
    events = _Recorder()
    timeout = 0.5
    t0 = time.perf_counter()
    train(_config(verdict, **{"train.loggers": ["wandb"], "train.logger_timeout": timeout}), tmp_path / "run",
          events=events)
    elapsed = time.perf_counter() - t0
    assert len(events.warnings) == 1 and "wandb" in events.warnings[0]
    assert "train.logger_timeout (0.5 s)" in events.warnings[0]
    _assert_same_run(tmp_path / "run", reference)
    assert elapsed < 120  # the run ended at all: nothing waited on the hung call (a 2-core CI box takes ~10 s)


def test_a_tracker_extra_not_installed_gives_one_warning_each_and_the_run_goes_on(verdict, tmp_path, reference,
                                                                                  monkeypatch):
    _faulty(monkeypatch, tmp_path, "missing")
    events = _Recorder()
    train(_config(verdict, **{"train.loggers": ["tensorboard", "wandb", "mlflow"]}), tmp_path / "run", events=events)
    assert sorted(w.split(":")[1].strip() for w in events.warnings) == ["mlflow", "tensorboard", "wandb"]
    for name in ("tensorboard", "wandb", "mlflow"):
        assert any(f"pip install 'gptcli[{name}]'" in w for w in events.warnings), name
    _assert_same_run(tmp_path / "run", reference)


def test_a_tracker_process_that_dies_is_one_warning_and_the_run_goes_on(verdict, tmp_path, reference, monkeypatch):
    _faulty(monkeypatch, tmp_path, "crash")
    events = _Recorder()
    train(_config(verdict, **{"train.loggers": ["mlflow"]}), tmp_path / "run", events=events)
    assert len(events.warnings) == 1, events.warnings
    assert "the tracker process ended (exit code 3)" in events.warnings[0]
    assert "training goes on" in events.warnings[0]
    _assert_same_run(tmp_path / "run", reference)


def test_trackers_run_outside_the_training_process_and_a_killed_run_ends_its_tracker_runs(tracker_env, tmp_path,
                                                                                         subprocess_env):
    """No tracker library is imported by training; SIGKILL of training closes the tracker run (MLflow: KILLED)."""
    import subprocess

    overrides = {"data.path": str(VERDICT), "train.loggers": ["mlflow"], "train.max_steps": 400, "train.num_epochs": 50,
                 "train.eval_freq": 1000, "train.save_freq": None}
    code = f"""
import json, os, signal, sys
from pathlib import Path
from gptcli.config import load_config
from gptcli.train import Events, train

class Killer(Events):
    def log(self, record):
        if record["step"] == 3:  # tracker modules imported into this process, if any
            print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("mlflow", "wandb", "tensorboard"))),
                  flush=True)
        if record["step"] == 40:
            os.kill(os.getpid(), signal.SIGKILL)

train(load_config({str(CONFIGS / "tiny.yaml")!r}, {overrides!r}), Path({str(tmp_path / "run")!r}), events=Killer())
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert json.loads(done.stdout.splitlines()[0]) == []  # the trackers live in their own process
    from mlflow.tracking import MlflowClient

    status, deadline = None, time.monotonic() + 120
    while time.monotonic() < deadline:  # the tracker process goes on alone: it opens, logs, then closes the run
        state = loggers.read_state(tmp_path / "run").get("mlflow", {})
        if "run_id" in state:
            status = MlflowClient(tracking_uri=state["tracking_uri"]).get_run(state["run_id"]).info.status
            if status != "RUNNING":
                break
        time.sleep(0.5)
    assert status == "KILLED"


def test_tracker_folders_are_gptcli_files_for_overwrite_and_foreign_checks(tmp_path):
    from gptcli.resolve import clear_run, foreign_entries

    run = tmp_path / "run"
    (run / "tensorboard").mkdir(parents=True)
    (run / "notes").mkdir()
    assert foreign_entries(run) == ["notes", "tensorboard"]  # without loggers.json a folder is the user's
    (run / "notes").rmdir()
    (run / loggers.STATE_FILE).write_text(json.dumps({"tensorboard": {"dir": "tensorboard"}}))
    assert foreign_entries(run) == [loggers.STATE_FILE, "tensorboard"]  # without run.json neither is a run's
    (run / "run.json").write_text(json.dumps({"format": "gptcli-run"}))
    assert foreign_entries(run) == []
    assert clear_run(run) == [loggers.STATE_FILE, "run.json", "tensorboard"]
