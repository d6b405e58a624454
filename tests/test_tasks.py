"""Multiple-choice tasks (issue 14): parsing, scoring by hand, parity with lm-evaluation-harness, bad input."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch

from conftest import tiny_model_config
from test_download import server  # noqa: F401 (the local HTTP server fixture)
from gptcli.checkpoint import save_checkpoint, step_dir_name
from gptcli.config import Config
from gptcli.model import GPTModel, export_state_dict
from gptcli.tasks import Item, accuracy, load_task, parse_hellaswag, score_items
from gptcli.tokenizer import encode

# Two items of HellaSwag's validation file, as rowanz/hellaswag publishes it (official field names);
# the second is a WikiHow item with the [title]/[step] artifacts the harness's preprocess removes.
HELLASWAG_LINES = [
    {"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
     "ctx": "A man is sitting on a roof. he", "split": "val", "split_type": "indomain", "label": 3,
     "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.", "is holding a rubik's cube.",
                 "starts pulling up roofing on a roof."], "source_id": "activitynet~v_-JhWjGDPHMY"},
    {"ind": 92, "activity_label": "Clean and Jerk", "ctx_a": "[header] How to lift weights [title] Warm up.",
     "ctx_b": "", "ctx": "[header] How to lift weights [title] Warm up. ", "split": "val", "split_type": "zeroshot",
     "label": "0", "endings": ["[step] Stretch first.", "Sleep.", "Eat a cake [substeps] now.", "Run away."],
     "source_id": "wikihow~1"},
]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def toy_items(n: int = 60) -> list[dict]:
    """A generated multiple-choice task: choices of different lengths, so acc and acc_norm can differ."""
    words = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white", "gray", "brown"]
    rows = []
    for i in range(n):
        choices = [words[(i + k) % len(words)] + (" car" if k == (i % 3) else "") for k in range(4)]
        rows.append({"context": f"Item {i}: the colour of the {['sky', 'sea', 'leaf', 'sun'][i % 4]} is",
                     "choices": choices, "answer": (i * 7) % 4})
    return rows


def sharp_model(seed: int = 5) -> GPTModel:
    """A tiny random model whose logits are far from uniform (a scaled output head), so choices differ clearly."""
    torch.manual_seed(seed)
    model = GPTModel(tiny_model_config(context_length=64, drop_rate=0.0))
    with torch.no_grad():
        model.out_head.weight.mul_(40.0)
    return model.eval()


@pytest.fixture
def toy_ckpt(tmp_path) -> Path:
    model = sharp_model()
    return save_checkpoint(tmp_path / "run", step_dir_name(1), export_state_dict(model), Config(model=model.cfg),
                           meta={"step": 1})


# ---------------------------------------------------------------- parsing


def test_hellaswag_official_fields_parse_with_the_harness_preprocess(tmp_path):
    items = parse_hellaswag(write_jsonl(tmp_path / "h.jsonl", HELLASWAG_LINES))
    assert items[0] == Item("Roof shingle removal: A man is sitting on a roof. He",
                            ("is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                             "is holding a rubik's cube.", "starts pulling up roofing on a roof."), 3)
    # [header] goes, " [title]" becomes ". ", a string label is an index, ctx_b "" leaves no capital
    assert items[1].context == "Clean and Jerk: How to lift weights. Warm up."
    assert items[1].choices == (" Stretch first.", "Sleep.", "Eat a cake now.", "Run away.")  # as the harness leaves it
    assert items[1].answer == 0
    # the harness's own hellaswag preprocess, applied to the raw lines, is the oracle
    from lm_eval.tasks.hellaswag.utils import preprocess

    for raw, item in zip(HELLASWAG_LINES, items):
        ctx = raw["ctx_a"] + " " + raw["ctx_b"].capitalize()
        assert item.context == preprocess(raw["activity_label"] + ": " + ctx)
        assert item.choices == tuple(preprocess(e) for e in raw["endings"])


@pytest.mark.parametrize("line, message", [
    ("{not json", "line 2: not JSON"),
    ("[1, 2]", "line 2: expected a JSON object"),
    (json.dumps({k: v for k, v in HELLASWAG_LINES[0].items() if k != "endings"}), "line 2: missing field 'endings'"),
    (json.dumps({**HELLASWAG_LINES[0], "label": 4}), "line 2: 'label' 4 is out of range (0..3 for 4 choices)"),
    (json.dumps({**HELLASWAG_LINES[0], "endings": "abc"}), "line 2: field 'endings' has the wrong type"),
])
def test_malformed_hellaswag_lines_are_one_line_errors_naming_the_line(tmp_path, line, message):
    from gptcli.errors import InputError

    path = write_jsonl(tmp_path / "h.jsonl", [HELLASWAG_LINES[0], line])
    with pytest.raises(InputError) as e:
        parse_hellaswag(path)
    assert message in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------- scoring


def test_two_item_task_matches_log_softmax_computed_by_hand():
    model = sharp_model()
    items = [Item("The cat sat on the", ("mat", "moon rocket"), 0), Item("One, two,", ("three", "banana split"), 1)]
    got = score_items(model, items)
    for item, lls in zip(items, got):
        for choice, ll in zip(item.choices, lls):
            ctx, whole = encode(item.context), encode(item.context + " " + choice)
            assert whole[:len(ctx)] == ctx  # the split the harness makes: the whole's tokens after the context's
            x = torch.tensor([whole[:-1]])
            with torch.no_grad():
                logp = torch.log_softmax(model(x)[0].double(), dim=-1)
            expected = sum(logp[pos - 1, whole[pos]].item() for pos in range(len(ctx), len(whole)))
            # float32 logits vs float64 log-softmax of the same logits: rounding only
            assert ll == pytest.approx(expected, abs=1e-4)
    result = accuracy(items, got)
    acc = [float(max(range(2), key=lambda k: ll[k]) == it.answer) for it, ll in zip(items, got)]
    norm = [float(max(range(2), key=lambda k: ll[k] / len(it.choices[k])) == it.answer) for it, ll in zip(items, got)]
    assert result["acc"] == sum(acc) / 2 and result["acc_norm"] == sum(norm) / 2
    assert result["items"] == 2


def test_stderr_is_the_sample_stderr_of_the_mean():
    from gptcli.tasks import mean_stderr

    scores = [1.0, 0.0, 0.0, 1.0, 1.0]
    p = 0.6
    assert mean_stderr(scores) == pytest.approx(math.sqrt(p * (1 - p) * 5 / 4) / math.sqrt(5), rel=1e-12)


# ---------------------------------------------------------------- parity with lm-evaluation-harness


def harness_task(tmp_path: Path, rows: list[dict]) -> Path:
    """A local lm-eval YAML task over a JSON Lines file (no network)."""
    data = write_jsonl(tmp_path / "toy.jsonl", rows)
    folder = tmp_path / "harness_tasks"
    folder.mkdir()
    (folder / "gptcli_toy.yaml").write_text(
        "task: gptcli_toy\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: \"{{context}}\"\n"
        "doc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: \"{{answer}}\"\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n", encoding="utf-8")
    return folder


def run_lm_eval(model: str, model_args: str, folder: Path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    import gptcli.harness  # noqa: F401 (registers the gptcli model type)

    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=["gptcli_toy"], batch_size=8,
                                  device="cpu", task_manager=TaskManager(include_path=str(folder)), log_samples=True)
    samples = sorted(out["samples"]["gptcli_toy"], key=lambda s: s["doc_id"])
    lls = [[float(r[0][0]) for r in s["resps"]] for s in samples]
    metrics = out["results"]["gptcli_toy"]
    return lls, metrics


def test_accuracy_and_loglikelihoods_equal_lm_eval_hf_and_our_adapter(cli, toy_ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rows = toy_items(60)
    folder = harness_task(tmp_path, rows)
    assert cli("export", toy_ckpt, tmp_path / "hf").exit_code == 0
    r = cli("eval", "--checkpoint", toy_ckpt, "--task", "choices", "--task-data", tmp_path / "toy.jsonl", "--json", "--per-item")
    assert r.exit_code == 0, r.stderr
    ours = json.loads(r.stdout)["tasks"]["choices"]
    hf_lls, hf = run_lm_eval("hf", f"pretrained={tmp_path / 'hf'},dtype=float32", folder)
    ad_lls, ad = run_lm_eval("gptcli", f"checkpoint={toy_ckpt}", folder)
    assert ours["items"] == 60
    for reference in (hf, ad):
        assert ours["acc"] == reference["acc,none"] and ours["acc_norm"] == reference["acc_norm,none"]
        assert ours["acc_stderr"] == pytest.approx(reference["acc_stderr,none"], rel=1e-9)  # same formula, float sums
    assert 0 < ours["acc"] < 1 and ours["acc"] != ours["acc_norm"]  # the task separates the two metrics
    # float32 forward passes of differently padded batches in two implementations: rounding only
    torch.testing.assert_close(torch.tensor(ours["loglikelihoods"]), torch.tensor(hf_lls), atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.tensor(ad_lls), torch.tensor(hf_lls), atol=1e-4, rtol=0)


# ---------------------------------------------------------------- the command line


@pytest.mark.parametrize("args, message", [
    (["--task", "winogrande"], "--task winogrande: unknown task; known: hellaswag, choices"),
    (["--task", "choices", "--task-data", "{bad}"], "'answer' 5 is out of range (0..1 for 2 choices)"),
    (["--task", "choices", "--task-data", "{empty}"], "no items (an empty task file)"),
    (["--task", "choices", "--task-data", "{good}", "--limit", "0"], "--limit"),
    (["--task", "choices"], "--task choices: needs --task-data FILE"),
    (["--task", "choices", "--task-data", "{good}", "--text", "hi"], "--text"),
    # the keys of refused flags (--batch-size, --data/--val): refused through --set too, not ignored
    (["--task", "choices", "--task-data", "{good}", "--set", "train.batch_size=1"], "--set train.batch_size: does not apply"),
    (["--task", "choices", "--task-data", "{good}", "--set", "data.path=x.txt"], "--set data.path: does not apply"),
    (["--text", "hi", "--set", "train.batch_size=1"], "--text and --set train.batch_size"),
    (["--task", "choices", "--task-data", "{deep}"], "line 1: not a task item (JSON nested too deeply)"),
    (["--task", "choices", "--task-data", "{folder}"], "a folder, not a JSON Lines file"),
])
def test_bad_task_input_is_one_line_and_exit_2(cli, toy_ckpt, tmp_path, args, message):
    files = {"{bad}": write_jsonl(tmp_path / "bad.jsonl", [{"context": "a", "choices": ["b", "c"], "answer": 5}]),
             "{empty}": write_jsonl(tmp_path / "empty.jsonl", []),
             "{good}": write_jsonl(tmp_path / "good.jsonl", toy_items(3)),
             "{deep}": write_jsonl(tmp_path / "deep.jsonl", ["[" * 100_000 + "]" * 100_000]), "{folder}": tmp_path}
    r = cli("eval", "--checkpoint", toy_ckpt, *[str(files.get(a, a)) for a in args])
    assert r.exit_code == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert message in lines[-1] and len([ln for ln in lines if "error" in ln]) == 1, r.stderr


def test_hellaswag_eval_prints_gpt2_baselines_beside_the_result(cli, toy_ckpt, tmp_path):
    data = write_jsonl(tmp_path / "h.jsonl", HELLASWAG_LINES)
    r = cli("eval", "--checkpoint", toy_ckpt, "--task", "hellaswag", "--task-data", data, "--json")
    assert r.exit_code == 0, r.stderr
    result = json.loads(r.stdout)["tasks"]["hellaswag"]
    assert result["items"] == 2 and set(result) >= {"acc", "acc_norm", "acc_stderr", "acc_norm_stderr", "baseline"}
    assert result["baseline"]["gpt2-124m"]["acc_norm"] == 0.3114
    assert result["baseline"]["gpt2-1558m"]["acc_norm"] == 0.5089
    r = cli("eval", "--checkpoint", toy_ckpt, "--task", "hellaswag", "--task-data", data)
    assert r.exit_code == 0 and "GPT-2 124M" in r.stdout and "0.3114" in r.stdout, r.stdout


def test_eval_task_says_which_data_file_it_chose_by_default(cli, toy_ckpt, tmp_path):
    default = tmp_path / "data" / "hellaswag" / "hellaswag_val.jsonl"
    default.parent.mkdir(parents=True)
    write_jsonl(default, HELLASWAG_LINES)
    r = cli("eval", "--checkpoint", toy_ckpt, "--task", "hellaswag", "--json")
    assert r.exit_code == 0, r.stderr
    assert "task data: data/hellaswag/hellaswag_val.jsonl (the default of --task hellaswag" in r.stderr
    r = cli("eval", "--checkpoint", toy_ckpt, "--task", "hellaswag", "--task-data", default, "--json")
    assert r.exit_code == 0 and "task data" not in r.stderr, r.stderr  # given, not chosen: nothing to say


# ---------------------------------------------------------------- gptcli download hellaswag


def test_git_blob_id_is_what_git_computes(tmp_path):
    import subprocess

    from gptcli.download import git_blob_sha1_file

    path = write_jsonl(tmp_path / "h.jsonl", HELLASWAG_LINES)
    expected = subprocess.run(["git", "hash-object", str(path)], capture_output=True, text=True, check=True).stdout.strip()
    assert git_blob_sha1_file(path) == expected


def test_download_hellaswag_verifies_resumes_and_removes_a_bad_copy(cli, server, tmp_path, monkeypatch):
    import hashlib

    from gptcli import tasks

    body = "".join(json.dumps(r) + "\n" for r in HELLASWAG_LINES * 400).encode()
    blob = hashlib.sha1(f"blob {len(body)}\0".encode() + body).hexdigest()
    monkeypatch.setitem(tasks.HELLASWAG_VAL, "git_blob_sha1", blob)  # the real file is not served offline
    path = tasks.HELLASWAG_VAL["url"].removeprefix("https://raw.githubusercontent.com")
    server.files[path] = body
    server.cut[path] = 1000  # the first transfer stops early
    r = cli("download", "hellaswag", "--endpoint", server.url)
    assert r.exit_code == 1 and "run again to resume" in r.stderr
    r = cli("download", "hellaswag", "--endpoint", server.url, "--json")
    assert r.exit_code == 0, r.stderr
    dest = Path("data/hellaswag/hellaswag_val.jsonl")
    assert dest.read_bytes() == body and json.loads(r.stdout)["path"] == str(dest)
    assert server.gets()[-1] == (path, "bytes=1000-")  # resumed where the cut left it
    assert len(parse_hellaswag(dest)) == 800
    # already there and verified: nothing fetched
    n = len(server.gets())
    r = cli("download", "hellaswag", "--endpoint", server.url)
    assert r.exit_code == 0 and len(server.gets()) == n and "already downloaded" in r.stderr
    # a server handing out other bytes: the download is refused and removed
    dest.unlink()
    server.files[path] = body.replace(b"roof", b"ROOF")
    r = cli("download", "hellaswag", "--endpoint", server.url)
    assert r.exit_code == 1 and "git blob id" in r.stderr and not dest.exists()
    assert not list(Path("data/hellaswag").glob("*.part"))


def test_download_hellaswag_never_replaces_a_file_it_did_not_write(cli, server, monkeypatch):
    from gptcli import tasks

    body = "".join(json.dumps(r) + "\n" for r in HELLASWAG_LINES).encode()
    monkeypatch.setitem(tasks.HELLASWAG_VAL, "git_blob_sha1", hashlib.sha1(f"blob {len(body)}\0".encode() + body).hexdigest())
    server.files[tasks.HELLASWAG_VAL["url"].removeprefix("https://raw.githubusercontent.com")] = body
    mine = Path("mine/hellaswag_val.jsonl")
    mine.parent.mkdir()
    mine.write_text("my own filtered copy\n")
    r = cli("download", "hellaswag", "--endpoint", server.url, "--out", "mine")
    assert r.exit_code == 2 and "never replaces a file it did not write" in r.stderr, r.stderr
    assert mine.read_text() == "my own filtered copy\n" and server.gets() == []


# ---------------------------------------------------------------- in training


def tiny_run_config(verdict, tmp_path, with_tasks: bool, **extra):
    from conftest import CONFIGS
    from gptcli.config import load_config

    data = write_jsonl(tmp_path / "train_task.jsonl", toy_items(8))
    values = {"data.path": str(verdict), "train.device": "cpu", "train.max_steps": 7, "train.eval_freq": 2,
              "train.save_freq": 3, "train.max_new_tokens": 0, "train.peak_flops": 1e12, **extra}
    if with_tasks:
        values["train.eval_tasks"] = [{"name": "choices", "data": str(data), "limit": 6}]
    return load_config(CONFIGS / "tiny.yaml", values)


def test_task_evaluation_does_not_change_book_exact_training(verdict, tmp_path):
    """Dropout is on (tiny.yaml drop_rate 0.1): any random draw by the task evaluation would change the losses."""
    from conftest import final_weights, run_losses
    from gptcli.train import train

    plain = train(tiny_run_config(verdict, tmp_path, False), tmp_path / "plain")
    scored = train(tiny_run_config(verdict, tmp_path, True), tmp_path / "scored")
    assert run_losses(tmp_path / "plain") == run_losses(tmp_path / "scored")
    a, b = final_weights(tmp_path / "plain"), final_weights(tmp_path / "scored")
    assert all(torch.equal(a[k], b[k]) for k in a)
    evals = [json.loads(line) for line in (tmp_path / "scored" / "metrics.jsonl").read_text().splitlines()
             if '"eval"' in line]
    assert [e["step"] for e in evals] == [1, 3, 5, 7] and all(e["tasks"]["choices"]["items"] == 6 for e in evals)
    assert "tasks" in scored and "tasks" not in plain  # --json of train carries the last scores


def test_resumed_run_continues_the_same_task_series(verdict, tmp_path):
    from conftest import keep_checkpoints_up_to
    from gptcli.train import train

    cfg = tiny_run_config(verdict, tmp_path, True)
    train(cfg, tmp_path / "full")
    resumed = keep_checkpoints_up_to(tmp_path / "full", tmp_path / "resumed", 3)
    train(cfg, resumed, resume=True)

    def series(run):
        return [(e["step"], e["tasks"]) for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                if e["event"] == "eval"]

    assert series(resumed) == series(tmp_path / "full") and len(series(resumed)) == 4


def test_eval_tasks_cadence_and_bad_entries(verdict, tmp_path):
    from gptcli.config import ConfigError
    from gptcli.errors import InputError
    from gptcli.train import train

    cfg = tiny_run_config(verdict, tmp_path, True, **{"train.eval_tasks_every": 4})
    train(cfg, tmp_path / "run")
    evals = [e for e in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
             if e["event"] == "eval"]
    assert [e["step"] for e in evals if "tasks" in e] == [1, 5, 7]  # every 4 steps, and the final weights
    with pytest.raises(ConfigError, match="train.eval_tasks_every: must be a positive multiple of train.eval_freq"):
        tiny_run_config(verdict, tmp_path, True, **{"train.eval_tasks_every": 3})
    with pytest.raises(ConfigError, match=r"train.eval_tasks\[0\].limit"):
        tiny_run_config(verdict, tmp_path, False, **{"train.eval_tasks": [{"name": "choices", "limit": 0}]})
    with pytest.raises(InputError, match=r"train.eval_tasks\[0\].name winogrande: unknown task; known: hellaswag"):
        train(tiny_run_config(verdict, tmp_path, False, **{"train.eval_tasks": ["winogrande"]}), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()  # refused before the run directory (its lock) was made


def test_bad_eval_tasks_are_refused_before_an_overwrite_deletes_the_run(verdict, tmp_path):
    """A refused config costs nothing: the run --overwrite would have replaced keeps every file."""
    from gptcli.errors import InputError
    from gptcli.train import train

    run = tmp_path / "run"
    train(tiny_run_config(verdict, tmp_path, False, **{"train.max_steps": 3}), run)
    before = sorted(p.name for p in run.iterdir())
    bad = tiny_run_config(verdict, tmp_path, False, **{"train.eval_tasks": [{"name": "hellaswag",
                                                                            "data": str(tmp_path / "none.jsonl")}]})
    with pytest.raises(InputError, match=r"train.eval_tasks\[0\].data"):
        train(bad, run, overwrite=True)
    assert sorted(p.name for p in run.iterdir()) == before and (run / "step-000003").is_dir()


def test_plot_draws_the_task_panel_and_baseline_lines(tmp_path, monkeypatch):
    from gptcli import report
    from gptcli.tasks import baseline

    drawn = []

    def record(self, y=0, *args, **kwargs):
        drawn.append((round(y, 6), kwargs.get("label")))

    import matplotlib.axes

    monkeypatch.setattr(matplotlib.axes.Axes, "axhline", record)
    events = [{"event": "eval", "step": s, "epoch": 1, "tokens_seen": 100 * s, "train_loss": 5.0, "val_loss": 5.5,
               "tasks": {"hellaswag": {"acc": 0.25, "acc_norm": 0.26 + s / 100, "items": 10}}} for s in (1, 3)]
    b = baseline("gpt2-124m")
    report.plot_losses(events, tmp_path / "p.png", b, corpus_sha256="not llm.c's data")
    assert drawn == [(0.3114, "OpenAI GPT-2 124M (lm-eval hellaswag 0-shot)")]  # no loss line: other data
    drawn.clear()
    measured_on = {**b, "val_loss": {**b["val_loss"], "data_sha256": "abc"}}
    report.plot_losses(events, tmp_path / "p.png", measured_on, corpus_sha256="abc")
    assert (3.424958, "OpenAI GPT-2 124M val loss") in drawn
    assert (tmp_path / "p.png").stat().st_size > 0


def test_plot_baseline_flag_names_unknown_sizes(cli, tmp_path):
    from gptcli.resolve import RUN_FORMAT

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text('{"format": "%s"}' % RUN_FORMAT)  # gptcli's marker of a run
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    r = cli("plot", tmp_path / "run", "--baseline", "gpt2-9m")
    assert r.exit_code == 2 and "--baseline gpt2-9m: unknown; known: gpt2-124m" in r.stderr
    r = cli("plot", tmp_path / "run", "--baseline", "gpt2-124m")
    assert r.exit_code == 0, r.stderr


def test_harness_task_from_our_cli_gives_the_task_numbers(cli, toy_ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    folder = harness_task(tmp_path, toy_items(12))
    r = cli("eval", "--checkpoint", toy_ckpt, "--harness-task", "gptcli_toy", "--harness-tasks-dir", folder,
            "--task", "choices", "--task-data", tmp_path / "toy.jsonl", "--json")
    assert r.exit_code == 0, r.stderr
    got = json.loads(r.stdout)["tasks"]
    assert got["gptcli_toy"]["acc"] == got["choices"]["acc"] and got["gptcli_toy"]["acc_norm"] == got["choices"]["acc_norm"]
    assert got["gptcli_toy"]["items"] == 12
    r = cli("eval", "--checkpoint", toy_ckpt, "--harness-task", "no_such_task", "--harness-tasks-dir", folder)
    assert r.exit_code == 2 and "--harness-task no_such_task: not an lm-eval task" in r.stderr


def test_harness_without_the_extra_names_the_pip_command(cli, toy_ckpt, monkeypatch):
    import sys

    import gptcli

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now fails as if not installed
    monkeypatch.delitem(sys.modules, "gptcli.harness", raising=False)
    monkeypatch.delattr(gptcli, "harness", raising=False)  # `from gptcli import harness` looks here first
    r = cli("eval", "--checkpoint", toy_ckpt, "--harness-task", "hellaswag")
    assert r.exit_code == 2 and "pip install 'gptcli[eval]'" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_adapter_rolling_loglikelihood_and_greedy_generation(toy_ckpt):
    from lm_eval.api.instance import Instance

    from gptcli.generate import generate
    from gptcli.harness import GptcliLM
    from gptcli.tokenizer import END_OF_TEXT_ID, decode

    lm = GptcliLM(checkpoint=str(toy_ckpt), device="cpu")
    text = "The quick brown fox jumps over the lazy dog. " * 3  # 30 tokens: one window of the 64-token model
    long_text = text * 4  # past the window: lm-eval's disjoint rolling windows
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    for t in (text, long_text):
        (got,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), 0)])
        windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
            token_list=encode(t), prefix_token=END_OF_TEXT_ID, max_seq_len=64, context_len=1)]
        assert len(windows) == (1 if t is text else 2)
        expected = 0.0
        with torch.no_grad():  # by hand: each window's predicted tokens given what precedes them in it
            for ctx, pred in windows:
                ids = ctx + pred
                logp = torch.log_softmax(lm.model(torch.tensor([ids[:-1]]))[0].double(), -1)
                expected += sum(logp[p - 1, ids[p]].item() for p in range(len(ctx), len(ids)))
        # float32 forward passes summed over up to 120 tokens vs a float64 log-softmax: rounding only
        assert got == pytest.approx(expected, abs=1e-3)
    (out,) = lm.generate_until([Instance("generate_until", {}, ("Once upon a time", {"until": ["zzz"], "max_gen_toks": 12}), 0)])
    (ids,) = generate(lm.model, [encode("Once upon a time")], 12, temperature=0.0, eos_id=END_OF_TEXT_ID)
    assert out == decode(ids)
    stop = decode(ids)[3:6]
    (cut,) = lm.generate_until([Instance("generate_until", {}, ("Once upon a time", {"until": [stop], "max_gen_toks": 12}), 0)])
    assert cut == decode(ids)[:decode(ids).index(stop)]


def test_eval_task_data_in_a_config_file_is_relative_to_that_file(tmp_path):
    from gptcli.config import load_config

    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "c.yaml").write_text("train:\n  eval_tasks:\n    - hellaswag\n"
                                             "    - {name: choices, data: mine.jsonl, limit: 5}\n")
    cfg = load_config(tmp_path / "cfg" / "c.yaml")
    assert cfg.train.eval_tasks == [{"name": "hellaswag", "data": None, "limit": None},
                                    {"name": "choices", "data": str(tmp_path / "cfg" / "mine.jsonl"), "limit": 5}]


def test_eval_task_data_of_set_is_saved_absolute_so_a_run_resumes_from_any_folder(cli, verdict, tmp_path, monkeypatch):
    from conftest import CONFIGS

    write_jsonl(tmp_path / "mine.jsonl", toy_items(4))
    tasks = "train.eval_tasks=[{name: choices, data: mine.jsonl}]"
    r = cli("train", "--config", CONFIGS / "tiny.yaml", "--data", verdict, "--max-steps", "1", "--out", "run",
            "--set", tasks, "--set", "train.max_new_tokens=0")
    assert r.exit_code == 0, r.stderr
    saved = (tmp_path / "run" / "step-000001" / "config.yaml").read_text()
    assert f"data: {tmp_path / 'mine.jsonl'}" in saved
    r = cli("train", "--out", "run", "--resume", "--max-steps", "2", "--set", tasks)  # the same file: no change
    assert r.exit_code == 0, r.stderr
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    r = cli("train", "--out", tmp_path / "run", "--resume", "--max-steps", "3")
    assert r.exit_code == 0, r.stderr


def test_rows_sharing_an_input_share_one_forward_and_score_as_alone():
    """One-token choices after a shared context have the same input (the context): one forward serves them,
    and each scores exactly what it scores alone; so does a row whose input equals another's by coincidence."""
    from gptcli.tasks import score_tokens

    torch.manual_seed(0)
    model = GPTModel(tiny_model_config()).eval()
    ctx = encode("The old house at the end of the road was")
    pairs = [(ctx, encode(" red")), (ctx, encode(" blue")), (ctx[:-1], ctx[-1:] + encode(" red")),
             (ctx, encode(" green with white trim")), (ctx[:5], encode(" far away"))]
    calls = []
    handle = model.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    try:
        together = score_tokens(model, pairs, batch_tokens=4096)
    finally:
        handle.remove()
    assert sum(calls) == 3  # rows 0-2 have one input (ctx), row 3 and row 4 their own
    alone = [score_tokens(model, [pair])[0] for pair in pairs]
    for (a, greedy_a), (b, greedy_b) in zip(together, alone):
        assert a == pytest.approx(b, abs=1e-5) and greedy_a == greedy_b  # other batch shapes: float rounding only


def test_a_harness_task_whose_data_cannot_be_fetched_is_one_line_exit_1(cli, toy_ckpt, monkeypatch):
    """Audit w2 #11: offline, --harness-task hellaswag ended in "internal error: ConnectionError"."""
    import lm_eval

    def offline(**kwargs):
        raise ConnectionError("Couldn't reach 'Rowan/hellaswag' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(lm_eval, "simple_evaluate", offline)
    r = cli("eval", "--checkpoint", toy_ckpt, "--harness-task", "hellaswag")
    assert r.exit_code == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "--harness-task hellaswag: lm-eval could not get the task's data" in r.stderr
    assert "internal error" not in r.stderr


def test_training_says_which_task_file_it_chose_by_default(verdict, tmp_path, monkeypatch):
    """train.eval_tasks: [hellaswag] with no data key scores data/hellaswag/hellaswag_val.jsonl: said, as eval says it."""
    from gptcli.train import Events, train

    class Notes(Events):
        def __init__(self):
            self.notes = []

        def note(self, message):
            self.notes.append(message)

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "hellaswag").mkdir(parents=True)
    write_jsonl(tmp_path / "data" / "hellaswag" / "hellaswag_val.jsonl", HELLASWAG_LINES)
    events = Notes()
    train(tiny_run_config(verdict, tmp_path, False, **{"train.max_steps": 1, "train.eval_tasks": ["hellaswag"]}),
          tmp_path / "run", events=events)
    assert [n for n in events.notes if n.startswith("train.eval_tasks")] == [
        "train.eval_tasks[0]: hellaswag from data/hellaswag/hellaswag_val.jsonl (the default; its data key chooses another)"]
