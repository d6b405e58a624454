"""One owner for which config, model, run directory and data a command uses (issue 12, findings 1-5, 9, 10)."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import CONFIGS, ROOT
from gptcli.checkpoint import list_step_checkpoints
from gptcli.config import ConfigError, load_config
from gptcli.errors import InputError
from gptcli.resolve import PRECEDENCE, RESUMABLE, clear_run, foreign_entries

TINY = CONFIGS / "tiny.yaml"
FAST = ["--set", "train.max_new_tokens=0", "--set", "train.peak_flops=1e11"]  # no sample, no peak probe


def tree(folder: Path) -> dict[str, bytes | str | None]:
    """Every path below `folder` with its bytes (a link: its target; a folder: None): what 'nothing deleted' compares."""
    return {str(p.relative_to(folder)): (os.readlink(p) if p.is_symlink() else None if p.is_dir() else p.read_bytes())
            for p in sorted(folder.rglob("*"))}


def train_tiny(cli, verdict, *args):
    return cli("train", "--config", TINY, "--data", verdict, "--max-steps", "2", *FAST, *args)


# ---------------------------------------------------------------- finding 1: --overwrite deletes only our run


def test_overwrite_never_deletes_files_gptcli_did_not_write(cli, verdict, tmp_path):
    """Issue 12 finding 1: `--out . --overwrite` in the user's folder deleted corpus, config and thesis."""
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(verdict, work / "corpus.txt")
    shutil.copy(TINY, work / "my.yaml")
    (work / "thesis.tex").write_text("\\documentclass{article}")
    os.chdir(work)
    before = tree(work)
    r = cli("train", "--config", "my.yaml", "--data", "corpus.txt", "--out", ".", "--overwrite", "--max-steps", "1",
            *FAST)
    assert r.exit_code == 2, r.stderr
    assert tree(work) == before
    assert "thesis.tex" in r.stderr and "3 thing(s)" in r.stderr
    assert "--overwrite" not in r.stderr  # the fix for a folder of the user's is another folder, never this flag


def test_existing_folder_of_the_user_is_refused_without_suggesting_overwrite(cli, verdict, tmp_path):
    """Issue 12 finding 1: the message for an existing non-run folder steered the user to --overwrite."""
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.md").write_text("mine")
    r = train_tiny(cli, verdict, "--out", folder)
    assert r.exit_code == 2 and "notes.md" in r.stderr and "--overwrite" not in r.stderr
    assert (folder / "notes.md").read_text() == "mine"


def test_overwrite_removes_a_runs_own_files_and_refuses_a_run_holding_anything_else(cli, verdict, tmp_path):
    """Issue 12 finding 1: only a gptcli run is cleared, and only when it holds nothing of the user's."""
    run = tmp_path / "run"
    assert train_tiny(cli, verdict, "--out", run).exit_code == 0
    (run / "step-000002" / "my-notes.txt").write_text("inside a step directory")
    before = tree(run)
    r = train_tiny(cli, verdict, "--out", run, "--overwrite")
    assert r.exit_code == 2 and "step-000002" in r.stderr
    assert tree(run) == before
    (run / "step-000002" / "my-notes.txt").unlink()
    r = cli("train", "--config", TINY, "--data", verdict, "--max-steps", "3", *FAST, "--out", run, "--overwrite")
    assert r.exit_code == 0, r.stderr
    assert [p.name for p in list_step_checkpoints(run)] == ["step-000003"]


OUR_NAMES = ["run.json", "metrics.jsonl", "metrics.csv", "losses.png", ".tmp-x-1", "step-000001", "latest"]
FOREIGN_NAMES = ["thesis.tex", "corpus.txt", "my.yaml", "step-1", "Latest", "data", "checkpoints", "run.json.bak",
                 "step-000002"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ours=st.lists(st.sampled_from(OUR_NAMES), unique=True),
    foreign=st.lists(st.sampled_from(FOREIGN_NAMES), min_size=1, unique=True),
    foreign_dirs=st.lists(st.booleans(), min_size=len(FOREIGN_NAMES), max_size=len(FOREIGN_NAMES)),
    payload=st.binary(max_size=16),
)
def test_overwrite_property_a_folder_that_is_not_a_run_loses_nothing(ours, foreign, foreign_dirs, payload):
    """Issue 12 finding 1 (property): random folder contents that are not a run -> nothing deleted."""
    from gptcli.rundir import prepare_run_dir as _prepare_run_dir

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "out"
        folder.mkdir()
        for name in ours:
            if name.startswith("step-"):  # a real-looking checkpoint: manifest listing its files
                (folder / name).mkdir()
                (folder / name / "model.safetensors").write_bytes(payload)
                (folder / name / "manifest.json").write_text(json.dumps(
                    {"format": "gptcli-checkpoint", "files": {"model.safetensors": {}}}))
            elif name == "latest":
                os.symlink("step-000001", folder / name)
            else:
                (folder / name).write_bytes(payload)
        for name, is_dir in zip(foreign, foreign_dirs):
            if name == "step-000002":  # a step directory without a manifest is not ours
                (folder / name).mkdir()
                (folder / name / "weights.bin").write_bytes(payload)
            elif is_dir:
                (folder / name).mkdir()
                (folder / name / "inner.txt").write_bytes(payload)
            else:
                (folder / name).write_bytes(payload)
        before = tree(folder)
        assert foreign_entries(folder)
        with pytest.raises(InputError):
            clear_run(folder)
        with pytest.raises(InputError):
            _prepare_run_dir(folder, resume=False, overwrite=True)
        assert tree(folder) == before


@pytest.mark.parametrize("with_resume", [False, True])
def test_rerunning_a_run_killed_before_its_first_save_starts_it_over(cli, verdict, tmp_path, with_resume):
    """Issue 12 finding 1: a run killed before its first checkpoint dead-ended ("exists" / "nothing to resume")."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"format": "gptcli-run", "config_source": str(TINY)}))
    (run / "metrics.jsonl").write_text('{"event": "train", "step": 1}\n')
    (run / ".lock").write_text("")
    (run / ".lock.pid").write_text("12345")
    r = train_tiny(cli, verdict, "--out", run, *(["--resume"] if with_resume else []))
    assert r.exit_code == 0, r.stderr
    assert "starting it over" in r.stderr
    assert [p.name for p in list_step_checkpoints(run)] == ["step-000002"]


def test_starting_over_never_deletes_damaged_checkpoints(cli, verdict, tmp_path):
    """Issue 12 finding 1: only a run with no checkpoint at all starts over; damaged ones stay for the user."""
    run = tmp_path / "run"
    assert train_tiny(cli, verdict, "--out", run).exit_code == 0
    weights = run / "step-000002" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    before = tree(run)
    for extra in (["--resume"], []):
        r = train_tiny(cli, verdict, "--out", run, *extra)
        assert r.exit_code == 2 and "starting it over" not in r.stderr, r.stderr
    assert tree(run) == before


@pytest.mark.parametrize("files", [
    {"metrics.csv": "x\n", "run.json": '{"mine": 1}\n'},
    {"latest": "my notes on the latest draft\n"},
    {"losses.png": "my own plot"},
    {".tmp-draft.txt": "a draft"},
], ids=["metrics-and-run-json", "latest", "losses-png", "tmp-draft"])
def test_a_folder_of_files_merely_named_like_gptclis_is_refused_and_kept(cli, verdict, tmp_path, files):
    """Audit f1 defect 1: files named like a run's were taken for a run "with no checkpoint yet" and wiped."""
    folder = tmp_path / "results"
    folder.mkdir()
    for name, text in files.items():
        (folder / name).write_text(text)
    before = tree(folder)
    for extra in ([], ["--overwrite"], ["--resume"]):
        r = train_tiny(cli, verdict, "--out", folder, *extra)
        assert r.exit_code == 2, (extra, r.stderr)
        assert "not a gptcli run directory" in r.stderr and all(name in r.stderr for name in files), r.stderr
        assert "starting it over" not in r.stderr
        assert tree(folder) == before


def killed_after_its_first_evaluation(cli, verdict, run: Path) -> Path:
    """`run` as SIGKILL leaves it after its first evaluation and before its first step checkpoint:
    run.json, metrics and a weights-only best/ (as train's save_best writes it), no step-*."""
    from gptcli.checkpoint import load_checkpoint, save_checkpoint

    assert train_tiny(cli, verdict, "--out", run).exit_code == 0
    ckpt = load_checkpoint(run / "step-000002")
    for name in ("latest", "best"):
        (run / name).unlink() if (run / name).is_symlink() else shutil.rmtree(run / name, ignore_errors=True)
    shutil.rmtree(run / "step-000002")
    save_checkpoint(run, "best", ckpt.weights, ckpt.config, None, {"step": 1, "reason": "best", "val_loss": 10.0})
    return run


def test_a_plain_restart_never_deletes_a_runs_best_weights(cli, verdict, tmp_path):
    """Audit f1 defect 1: a run killed after its first evaluation lost its best/ to a plain `train --out RUN`."""
    run = killed_after_its_first_evaluation(cli, verdict, tmp_path / "run")
    before = tree(run)
    r = train_tiny(cli, verdict, "--out", run)
    assert r.exit_code == 2, r.stderr
    assert "best" in r.stderr and "--resume" in r.stderr and "--overwrite" in r.stderr, r.stderr
    assert tree(run) == before
    r = train_tiny(cli, verdict, "--out", run, "--overwrite")  # asked for: replaced
    assert r.exit_code == 0, r.stderr


def test_resume_before_the_first_step_checkpoint_starts_over_with_the_runs_own_config(cli, verdict, tmp_path):
    """Audit f1 defect 2: `--resume` of a run with only best/ restarted with the built-in 124M config."""
    from gptcli.resolve import resolve_train

    run = killed_after_its_first_evaluation(cli, verdict, tmp_path / "run")
    plan = resolve_train(None, [], {"data.path": str(verdict), "train.max_steps": 1}, out=run, resume=True)
    assert plan.mode == "restart" and plan.cfg.model.emb_dim == 32 and plan.cfg.train.max_steps == 1
    r = cli("train", "--out", run, "--resume", "--data", verdict, "--max-steps", "1", *FAST)
    assert r.exit_code == 0, r.stderr
    said = [line for line in r.stderr.splitlines() if "starting it over" in line]
    assert len(said) == 1 and str(run / "best" / "config.yaml") in said[0], r.stderr
    assert yaml.safe_load((run / "step-000001" / "config.yaml").read_text())["model"]["emb_dim"] == 32


def test_resume_without_any_checkpoint_takes_the_config_run_json_names_or_asks_for_one(verdict, tmp_path):
    """Audit f1 defect 2: with no best/ either, the run's config file (run.json config_source) is its config."""
    from gptcli.resolve import resolve_train

    run = tmp_path / "run"
    run.mkdir()
    manifest = {"format": "gptcli-run", "config_source": str(TINY), "state": "running"}
    (run / "run.json").write_text(json.dumps(manifest))
    plan = resolve_train(None, [], {"data.path": str(verdict)}, out=run, resume=True)
    assert plan.cfg.model.emb_dim == 32 and any(str(TINY) in n for n in plan.notes)
    manifest["config_source"] = str(tmp_path / "gone.yaml")
    (run / "run.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="config=FILE"):
        resolve_train(None, [], {"data.path": str(verdict)}, out=run, resume=True)


# ---------------------------------------------------------------- finding 2: --config/--set with a checkpoint


@pytest.fixture
def tiny_run(cli, verdict, tmp_path):
    """A 2-step tiny run in ./checkpoints/other (the newest checkpoint there)."""
    r = train_tiny(cli, verdict, "--name", "other")
    assert r.exit_code == 0, r.stderr
    return tmp_path / "checkpoints" / "other"


def test_explicit_config_is_never_silently_replaced_by_another_runs_checkpoint(cli, verdict, tiny_run, tmp_path):
    """Issue 12 finding 2: `loss --config C` evaluated the newest checkpoint instead, without a word."""
    mine = tmp_path / "mine.yaml"
    shutil.copy(TINY, mine)
    r = cli("loss", "--config", mine, "--data", verdict, "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["model"].startswith("untrained")
    assert "untrained, from --config" in r.stderr and str(mine) in r.stderr


def test_a_command_that_picks_the_model_says_which_on_stderr(cli, verdict, tiny_run):
    """Issue 12 finding 2: whenever a command picks a model by itself, stderr names it in one line."""
    for args in (["loss", "--data", verdict], ["generate", "hi", "--max-new-tokens", "2"], ["eval", "--data", verdict]):
        r = cli(*args)
        assert r.exit_code == 0, r.stderr
        assert re.search(rf"model: \S*{tiny_run.name}/step-000002 \(the newest checkpoint under", r.stderr), r.stderr


def test_set_beside_a_checkpoint_applies_or_is_refused_by_name(cli, verdict, tiny_run):
    """Issue 12 finding 2: --set data.*, train.* changed nothing with a checkpoint; model shape must be refused."""
    base = ["loss", "--checkpoint", tiny_run, "--json", "--eval-iter", "1"]
    plain = json.loads(cli(*base).stdout)
    half = cli(*base, "--set", "data.train_ratio=0.5")
    assert half.exit_code == 0, half.stderr
    assert json.loads(half.stdout)["val"]["tokens"] == plain["val"]["tokens"]  # one batch of the same size...
    full = json.loads(cli("loss", "--checkpoint", tiny_run, "--json").stdout)
    halved = json.loads(cli("loss", "--checkpoint", tiny_run, "--json", "--set", "data.train_ratio=0.5").stdout)
    assert halved["val"]["tokens"] > full["val"]["tokens"]  # ...but a larger validation split
    batch = json.loads(cli(*base, "--set", "train.batch_size=1").stdout)
    assert batch["train"]["tokens"] == plain["train"]["tokens"] // 4  # tiny.yaml: batch_size 4
    r = cli(*base, "--set", "model.n_layers=3")
    assert r.exit_code == 2 and "model.n_layers" in r.stderr and "--set" in r.stderr


def test_set_device_behaves_like_the_device_flag(cli, tiny_run):
    """Issue 12 finding 2: `--set train.device=cuda` ran on the CPU while `--device cuda` was refused."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    flag = cli("generate", "hi", "--checkpoint", tiny_run, "--device", "cuda")
    via_set = cli("generate", "hi", "--checkpoint", tiny_run, "--set", "train.device=cuda")
    assert flag.exit_code == via_set.exit_code == 2
    assert "CUDA is not available" in flag.stderr and "CUDA is not available" in via_set.stderr


# ---------------------------------------------------------------- finding 3: resume keeps the run's config


def _config_with(tmp_path: Path, verdict: Path, **train_or_model) -> Path:
    cfg = yaml.safe_load(TINY.read_text())
    cfg["data"]["path"] = str(verdict)
    for key, value in train_or_model.items():
        section, _, name = key.partition("__")
        cfg[section][name] = value
    path = tmp_path / "gelu-tanh.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("latest", ["dangling", "missing"])
def test_resume_by_name_takes_the_config_of_the_newest_verified_checkpoint(cli, verdict, tmp_path, latest):
    """Issue 12 finding 3: --name X --resume fell back to the default config; a dangling `latest` too."""
    config = _config_with(tmp_path, verdict, model__gelu="tanh")
    assert cli("train", "--config", config, "--name", "r", "--max-steps", "2", *FAST).exit_code == 0
    run = tmp_path / "checkpoints" / "r"
    (run / "latest").unlink()
    if latest == "dangling":
        os.symlink("step-000009", run / "latest")
    r = cli("train", "--name", "r", "--resume", "--max-steps", "3", *FAST, "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["steps"] == 3
    saved = yaml.safe_load((run / "step-000003" / "config.yaml").read_text())
    assert saved["model"]["gelu"] == "tanh" and saved["train"]["max_steps"] == 3


def test_resume_refuses_a_changed_key_naming_it_and_its_source(cli, verdict, tmp_path):
    """Issue 12 finding 3: what may change on resume is a list; anything else is refused by name."""
    run = tmp_path / "run"
    assert train_tiny(cli, verdict, "--out", run).exit_code == 0
    r = cli("train", "--out", run, "--resume", "--set", "train.learning_rate=0.01", "--max-steps", "3")
    assert r.exit_code == 2 and "train.learning_rate" in r.stderr and "--set" in r.stderr
    r = cli("train", "--out", run, "--resume", "--learning-rate", "0.01", "--seed", "7")
    assert r.exit_code == 2 and "(from --learning-rate)" in r.stderr and "(from --seed)" in r.stderr
    r = cli("train", "--out", run, "--resume", "--set", "train.eval_iter=1", "--max-steps", "3", *FAST)
    assert r.exit_code == 0, r.stderr


# ---------------------------------------------------------------- finding 4: naming and contradictions


def test_init_from_without_config_is_named_after_its_source(cli, verdict, tiny_run, tmp_path):
    """Issue 12 finding 4: `train --init-from CKPT` named the run checkpoints/config."""
    r = cli("train", "--init-from", tiny_run, "--max-steps", "1", *FAST)
    assert r.exit_code == 0, r.stderr
    assert not (tmp_path / "checkpoints" / "config").exists()
    assert (tmp_path / "checkpoints" / "other-continued" / "step-000001").is_dir()
    assert "named after --init-from" in r.stderr


@pytest.mark.parametrize("flags, names", [
    (["--resume", "--overwrite"], ("--resume", "--overwrite")),
    (["--resume", "--init-from", "."], ("--resume", "--init-from")),
    (["--out", "x", "--name", "y"], ("--out", "--name")),
])
def test_contradictory_flags_are_refused_naming_both(cli, verdict, flags, names):
    """Issue 12 finding 4: --resume --init-from and --resume --overwrite were accepted, one flag dropped."""
    r = cli("train", "--config", TINY, "--data", verdict, *flags)
    assert r.exit_code == 2 and all(n in r.stderr for n in names), r.stderr


# ---------------------------------------------------------------- finding 5: what a resume can continue


def test_resume_with_another_global_batch_is_refused(cli, verdict, tmp_path):
    """Issue 12 finding 5: a resume at another batch size silently skipped most of the epoch."""
    run = tmp_path / "run"
    assert train_tiny(cli, verdict, "--out", run).exit_code == 0
    r = cli("train", "--out", run, "--resume", "--batch-size", "8", "--max-steps", "4")
    # The library names config keys (train.batch_size); the CLI may map them to flags (--batch-size).
    assert r.exit_code == 2 and "train.batch_size 8 x 1 process(es)" in r.stderr
    assert re.search(r"(--batch-size|train\.batch_size) 4", r.stderr)


def test_resume_with_another_process_count_is_refused(cli, verdict, tmp_path):
    """Issue 12 finding 5: the epoch position counts batches of the saved process count."""
    run = tmp_path / "run"
    assert train_tiny(cli, verdict, "--out", run).exit_code == 0
    manifest = json.loads((run / "run.json").read_text())
    manifest["world_size"] = 2
    (run / "run.json").write_text(json.dumps(manifest))
    r = cli("train", "--out", run, "--resume", "--max-steps", "4")
    # The library names config keys (train.batch_size); the CLI may map them to flags (--batch-size).
    assert r.exit_code == 2 and re.search(r"(--batch-size|train\.batch_size) 4", r.stderr) and "2 process" in r.stderr


def test_resume_checks_the_process_count_of_the_session_that_saved_the_checkpoint(cli, verdict, tmp_path):
    """A resume at 2 processes killed before its first checkpoint must not change the global batch the run
    resumes at: the checkpoint was saved by 1 process at batch 4."""
    run = tmp_path / "run"
    assert train_tiny(cli, verdict, "--out", run).exit_code == 0
    manifest = json.loads((run / "run.json").read_text())
    step = json.loads((run / "latest" / "manifest.json").read_text())["step"]
    manifest["resumes"].append({"at_step": step, "time": manifest["started"], "command": [], "device": "cpu",
                                "world_size": 2})  # batch 2 x 2 processes, SIGKILLed before it saved
    (run / "run.json").write_text(json.dumps(manifest))
    r = cli("train", "--out", run, "--resume", "--batch-size", "8", "--max-steps", str(step + 1))
    assert r.exit_code == 2 and "the run's is 4 x 1 = 4" in r.stderr, r.stderr
    r = cli("train", "--out", run, "--resume", "--max-steps", str(step + 1), *FAST)
    assert r.exit_code == 0, r.stderr


def test_resume_on_another_corpus_needs_allow_data_change_and_a_shorter_one_is_a_clear_error(cli, verdict, tmp_path):
    """Issue 12 finding 5: another corpus was accepted without a word; a shorter one gave StopIteration."""
    run = tmp_path / "run"
    assert train_tiny(cli, verdict, "--out", run).exit_code == 0
    short = tmp_path / "short.txt"
    short.write_text(verdict.read_text()[: len(verdict.read_text()) // 2])
    r = cli("train", "--out", run, "--resume", "--data", short, "--max-steps", "4")
    assert r.exit_code == 2 and re.search(r"allow.data.change", r.stderr) and "sha256" in r.stderr
    r = cli("train", "--out", run, "--resume", "--data", short, "--max-steps", "4", "--allow-data-change")
    assert r.exit_code == 2 and "windows" in r.stderr and "internal error" not in r.stderr
    copy = tmp_path / "copy.txt"
    shutil.copy(verdict, copy)  # the same text elsewhere: the same corpus
    r = cli("train", "--out", run, "--resume", "--data", copy, "--max-steps", "3", *FAST)
    assert r.exit_code == 0, r.stderr


def test_an_allowed_data_change_is_recorded_so_the_next_resume_checks_the_new_corpus(cli, verdict, tmp_path):
    """Audit w1 #7: after --allow-data-change, run.json still named the old corpus: a plain --resume
    of the run (its saved config names the new one) was refused, the old corpus passed silently,
    and an unreadable run.json skipped the check without a word."""
    run = tmp_path / "run"
    assert train_tiny(cli, verdict, "--out", run).exit_code == 0
    changed = tmp_path / "changed.txt"
    changed.write_text(verdict.read_text().replace("Gisburn", "Gisborn"))
    r = cli("train", "--out", run, "--resume", "--data", changed, "--max-steps", "3", "--allow-data-change", *FAST)
    assert r.exit_code == 0, r.stderr
    manifest = json.loads((run / "run.json").read_text())
    assert manifest["corpus"]["path"] == str(changed) and manifest["resumes"][-1]["corpus"] == manifest["corpus"]
    r = cli("train", "--out", run, "--resume", "--max-steps", "4", *FAST)  # the saved config's changed.txt
    assert r.exit_code == 0, r.stderr
    r = cli("train", "--out", run, "--resume", "--data", verdict, "--max-steps", "5", *FAST)  # no longer its corpus
    assert r.exit_code == 2 and re.search(r"allow.data.change", r.stderr), r.stderr
    # an unreadable run.json cannot vouch for the corpus: refused (it is not gptcli's any more), not skipped
    (run / "run.json").write_text("{broken")
    r = cli("train", "--out", run, "--resume", "--max-steps", "5", *FAST)
    assert r.exit_code == 2 and "run.json" in r.stderr, r.stderr
    manifest.pop("corpus")  # gptcli's, naming no corpus (hand-edited): refused unless the change is allowed
    (run / "run.json").write_text(json.dumps(manifest))
    r = cli("train", "--out", run, "--resume", "--max-steps", "5", *FAST)
    assert r.exit_code == 2 and "run.json" in r.stderr and re.search(r"allow.data.change", r.stderr), r.stderr
    r = cli("train", "--out", run, "--resume", "--max-steps", "5", "--allow-data-change", *FAST)
    assert r.exit_code == 0, r.stderr


def test_resuming_a_finished_run_says_so_and_how_to_extend_it(cli, verdict, tmp_path):
    """Issue 12 finding 5: a finished run printed "resuming ... 240 steps" and silently did nothing."""
    run = tmp_path / "run"
    assert train_tiny(cli, verdict, "--out", run).exit_code == 0
    r = cli("train", "--out", run, "--resume", *FAST)
    assert r.exit_code == 0, r.stderr
    assert "already finished at step 2" in r.stderr and "--max-steps N" in r.stderr  # the flag, as the user gives it
    assert [p.name for p in list_step_checkpoints(run)] == ["step-000002"]


def test_resuming_a_finished_run_leaves_it_untouched(cli, verdict, tmp_path):
    """Audit f1 defect 5: a no-op resume said "resuming", added a phantom `resumes` entry and rewrote the metrics."""
    run = tmp_path / "run"
    trained = train_tiny(cli, verdict, "--out", run, "--json")
    assert trained.exit_code == 0
    before = tree(run)
    r = cli("train", "--out", run, "--resume", "--json", *FAST)
    assert r.exit_code == 0, r.stderr
    assert "already finished at step 2" in r.stderr, r.stderr
    assert not any(line.startswith("resuming") for line in r.stderr.splitlines()), r.stderr
    summary = json.loads(r.stdout)
    assert summary["steps"] == 2 and summary["checkpoint"] == str(run / "step-000002")
    # The run's own time and speed (its sessions', as of its last checkpoint, saved just before the end of the
    # session that trained it), not "0 s, no speed" for this session that trained nothing.
    assert 0 < summary["elapsed_s"] <= json.loads(trained.stdout)["elapsed_s"]
    assert summary["tokens_per_s"] == summary["tokens_seen"] / summary["elapsed_s"]
    assert tree(run) == before
    assert json.loads((run / "run.json").read_text())["resumes"] == []


# ---------------------------------------------------------------- finding 9: paths


def test_config_paths_are_relative_to_the_config_file(cli, verdict, tmp_path):
    """Issue 12 finding 9: a config run from another folder looked for its data in the working directory."""
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(verdict, project / "corpus.txt")
    cfg = yaml.safe_load(TINY.read_text())
    cfg["data"]["path"] = "corpus.txt"
    (project / "my.yaml").write_text(yaml.safe_dump(cfg))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.chdir(elsewhere)
    r = cli("loss", "--config", project / "my.yaml", "--eval-iter", "1", "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["data"] == str(project / "corpus.txt")
    # The shipped configs keep pointing at the checkout's data/ folder, from anywhere.
    assert load_config(CONFIGS / "quickstart.yaml").data.path == str((ROOT / "data" / "quickstart.txt").resolve())


def test_tilde_in_a_config_path_is_expanded(tmp_path, monkeypatch):
    """Issue 12 finding 9: `~` in a YAML path was not expanded."""
    monkeypatch.setenv("HOME", str(tmp_path))
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  path: ~/corpus.txt\n")
    assert load_config(path).data.path == str(tmp_path / "corpus.txt")
    assert load_config(None, sets=["data.path=~/x.txt"]).data.path == str(tmp_path / "x.txt")


def test_checkpoints_record_paths_that_work_from_any_folder(cli, verdict, tmp_path):
    """Issue 12 finding 9: `eval /abs/run` from elsewhere failed with "data file not found"."""
    shutil.copy(verdict, tmp_path / "corpus.txt")
    assert cli("train", "--config", TINY, "--data", "corpus.txt", "--max-steps", "2", *FAST, "--out", "run").exit_code == 0
    saved = yaml.safe_load((tmp_path / "run" / "step-000002" / "config.yaml").read_text())
    assert saved["data"]["path"] == str(tmp_path / "corpus.txt")
    (tmp_path / "elsewhere").mkdir()
    os.chdir(tmp_path / "elsewhere")
    r = cli("eval", "--checkpoint", tmp_path / "run", "--eval-iter", "1")
    assert r.exit_code == 0, r.stderr


@pytest.mark.parametrize("how, source", [
    (["--data", "missing.txt"], "--data"),
    (["--set", "data.path=missing.txt"], "--set"),
    ([], "bad.yaml"),
])
def test_a_missing_data_path_says_where_the_path_came_from(cli, tmp_path, how, source):
    """Issue 12 finding 9: path errors did not say whether the path came from a flag, --set or a file."""
    bad = tmp_path / "bad.yaml"
    cfg = yaml.safe_load(TINY.read_text())
    cfg["data"]["path"] = "nowhere.txt"
    bad.write_text(yaml.safe_dump(cfg))
    source = source if source.startswith("--") else str(bad)
    for command in ("train", "loss"):
        r = cli(command, "--config", bad, *how)
        assert r.exit_code == 2 and "data file not found" in r.stderr and f"from {source})" in r.stderr, r.stderr


def test_a_checkpoints_missing_corpus_is_named_as_the_checkpoints(cli, verdict, tmp_path):
    """Issue 12 finding 9: a path from a checkpoint's saved config says so when it is missing."""
    corpus = tmp_path / "corpus.txt"
    shutil.copy(verdict, corpus)
    assert train_tiny(cli, corpus, "--out", "run").exit_code == 0
    corpus.unlink()
    for command in (["eval", "--checkpoint", "run"], ["loss", "--checkpoint", "run"]):
        r = cli(*command)
        assert r.exit_code == 2, r.stderr
        assert f"{corpus}: data file not found (data.path from the checkpoint's config" in r.stderr, r.stderr


def test_eval_of_data_files_never_downloads_the_models_corpus(cli, verdict, tiny_run, tmp_path, no_network):
    """Issue 12 finding 9: `eval --checkpoint X --data notes.txt` tried to download the-verdict."""
    step = tiny_run / "step-000002"
    (tmp_path / "moved").mkdir()
    os.chdir(tmp_path / "moved")
    shutil.copytree(step, "imported")
    cfg = yaml.safe_load(Path("imported/config.yaml").read_text())
    cfg["data"]["path"] = str(tmp_path / "gone" / "the-verdict.txt")
    Path("imported/config.yaml").write_text(yaml.safe_dump(cfg))
    manifest = json.loads(Path("imported/manifest.json").read_text())
    from gptcli.download import sha256_file

    manifest["files"]["config.yaml"] = {"sha256": sha256_file(Path("imported/config.yaml")),
                                        "bytes": Path("imported/config.yaml").stat().st_size}
    Path("imported/manifest.json").write_text(json.dumps(manifest))
    shutil.copy(verdict, "notes.txt")
    r = cli("eval", "--checkpoint", "imported", "--data", "notes.txt", "--eval-iter", "1")
    assert r.exit_code == 0, r.stderr
    assert "validation split skipped" in r.stderr and "notes.txt" in r.stdout
    assert not (tmp_path / "gone").exists()


def test_a_failed_download_leaves_no_empty_data_folder(tmp_path, monkeypatch):
    """Issue 12 finding 9: a failed download of the corpus left an empty data/ behind."""
    from gptcli import download as dl
    from gptcli.errors import RunError

    def fail(*args, **kwargs):
        raise RunError("download: no network")

    monkeypatch.setattr(dl, "_fetch", fail)
    with pytest.raises(RunError):
        dl.download("https://example.invalid/x.txt", tmp_path / "data" / "sub" / "x.txt")
    assert not (tmp_path / "data").exists()


# ---------------------------------------------------------------- finding 10: config files


@pytest.mark.parametrize("text, what", [
    ("train:\n  batch_size: 4\n  batch_size: 8\n", "'batch_size' at line 3"),
    ("train:\n  batch_size: 4\nmodel:\n  n_layers: 2\ntrain:\n  seed: 1\n", "'train' at line 5"),
])
def test_duplicate_yaml_keys_and_sections_are_refused(tmp_path, text, what):
    """Issue 12 finding 10: a duplicated section or key was silently merged (the last won)."""
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"duplicate key {what}"):
        load_config(path)


def test_set_errors_name_set_not_the_yaml_file(cli, tmp_path):
    """Issue 12 finding 10: `--set train.batch_size=0` was reported as an error of the YAML file."""
    with pytest.raises(ConfigError) as e:
        load_config(TINY, sets=["train.batch_size=0"])
    assert str(e.value).startswith("--set: train.batch_size") and str(TINY) not in str(e.value)
    bad = _bad_yaml(tmp_path)  # a bad value in the file is still the file's, whatever --set adds
    with pytest.raises(ConfigError, match=f"^{re.escape(str(bad))}: train.batch_size"):
        load_config(bad, sets=["train.seed=1"])
    r = cli("loss", "--config", TINY, "--set", "train.batch_size=0")
    assert r.exit_code == 2 and "--set: train.batch_size" in r.stderr
    r = cli("train", "--config", TINY, "--learning-rate", "0")  # a dedicated flag is named as such
    assert r.exit_code == 2 and "--learning-rate: train.learning_rate: must be positive" in r.stderr


def _bad_yaml(tmp_path: Path) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  batch_size: 0\n")
    return path


# ---------------------------------------------------------------- README: the precedence table


def _readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index(title)
    end = text.find("\n#", start + len(title))
    return text[start:end if end != -1 else None]


def test_readme_precedence_table_matches_the_code():
    """Issue 12 "What to build" 1: one precedence rule, written once in the README as a table."""
    rows = [line for line in _readme_section("#### Precedence").splitlines() if line.startswith("| ")][1:]
    names = [row.split("|")[2].strip().strip("`") for row in rows if row.split("|")[1].strip().isdigit()]
    assert names == [name for name, _ in PRECEDENCE]


def test_readme_lists_exactly_what_may_change_on_resume():
    """Issue 12 finding 3: what may change on resume is a documented list (the one the code applies)."""
    section = _readme_section("#### What may change on resume")
    assert set(re.findall(r"`((?:train|data|model)\.[a-z_]+)`", section)) == set(RESUMABLE)


def test_tilde_in_a_path_flag_is_the_home_folder_never_a_folder_named_tilde(cli, verdict, tmp_path, monkeypatch):
    """`--out=~/run` reaches gptcli unexpanded (the shell expands `~` only at a word's start):
    train and prepare made a folder literally named `~` in the working directory, and
    `eval --data '~/x'` said "data file not found"."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    shutil.copy(verdict, home / "corpus.txt")
    r = cli("train", "--config", TINY, "--data", "~/corpus.txt", "--max-steps", "1", *FAST, "--out", "~/run")
    assert r.exit_code == 0, r.stderr
    assert r.stdout.strip() == str(home / "run" / "step-000001")
    r = cli("prepare", "~/corpus.txt", "--out", "~/prepared", "--val-ratio", "0.5", "--split-docs", "blank-lines")
    assert r.exit_code == 0, r.stderr
    r = cli("eval", "--checkpoint", "~/run", "--data", "~/corpus.txt", "--data", "~/prepared", "--no-val",
            "--eval-iter", "1", "--json")
    assert r.exit_code == 0, r.stderr
    assert not (tmp_path / "~").exists() and (home / "prepared" / "index.json").is_file()


def test_tilde_in_config_flag_is_expanded_before_the_file_is_checked(cli, tmp_path, monkeypatch):
    """`--config=~/c.yaml` was refused by the flag's own existence check ("file '~/c.yaml' does not exist")
    before any expansion; README: `~` is expanded in path flags too."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    shutil.copy(TINY, home / "c.yaml")
    r = cli("generate", "hi", "--config=~/c.yaml", "--max-new-tokens", "1")
    assert r.exit_code == 0, r.stderr
    assert f"from --config {home / 'c.yaml'}" in r.stderr
    r = cli("generate", "hi", "--config=~/missing.yaml")
    assert r.exit_code == 2 and "'~/missing.yaml' does not exist" in r.stderr, r.stderr


def test_a_wildcard_data_path_says_only_prepare_expands_them(cli, verdict, tmp_path):
    """Audit w3 #19: `prepare 'pq/*.txt'` works; `train`/`eval --data 'pq/*.txt'` only said "not found"."""
    for command in (["train", "--config", TINY, "--out", "r"], ["loss", "--config", TINY]):
        r = cli(*command, "--data", "texts/*.txt")
        assert r.exit_code == 2 and "texts/*.txt: data file not found" in r.stderr and "gptcli prepare" in r.stderr
    assert train_tiny(cli, verdict, "--out", "run").exit_code == 0
    r = cli("eval", "--checkpoint", "run", "--data", "texts/*.txt", "--no-val")
    assert r.exit_code == 2 and "(from --data); wildcards are expanded by `gptcli prepare` only" in r.stderr
