"""Weighted mixtures of prepared corpora (issue 16 item 3): proportions, exact resume, per-source loss, errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from gptcli import shards
from gptcli.config import load_config
from gptcli.mixture import MixtureBatchSampler, MixtureWindows
from gptcli.shards import prepare
from gptcli.train import train

from conftest import CONFIGS, final_weights, run_losses
from test_shards import _one_line_error


def _mixture(sizes=(50, 500), weights=(0.7, 0.3)) -> MixtureWindows:
    return MixtureWindows([range(n) for n in sizes], [f"s{i}" for i in range(len(sizes))], weights)


def _draw(sampler: MixtureBatchSampler, batches: int, start: int = 0) -> list[list[int]]:
    """`batches` batches from an epoch resumed after `start` windows (as train.py drives it)."""
    out = []
    while len(out) < batches:
        for batch in sampler:
            out.append(batch)
            if len(out) == batches:
                break
    return out


def test_mixture_draws_sources_within_2_percent_of_their_weights_over_10000_windows():
    data = _mixture(sizes=(50, 500, 120), weights=(0.5, 0.3, 0.2))
    torch.manual_seed(0)
    batches = _draw(MixtureBatchSampler(data, 10, True, True), 1000)
    counts = [0, 0, 0]
    for batch in batches:
        for i in batch:
            counts[data.source_of(i)] += 1
    assert sum(counts) == 10_000
    for count, weight in zip(counts, (0.5, 0.3, 0.2)):
        assert abs(count / 10_000 - weight) < 0.02, counts  # the acceptance bound (binomial sd here <= 0.5 %)
    # Each source walks through a permutation before repeating a window.
    first_50 = [i for b in batches for i in b if data.source_of(i) == 0][:50]
    assert sorted(first_50) == list(range(50))
    torch.manual_seed(0)
    assert _draw(MixtureBatchSampler(data, 10, True, True), 1000) == batches  # deterministic from the seed


def test_mixture_sampler_resumed_from_its_state_continues_the_same_windows():
    data = _mixture()
    torch.manual_seed(1)
    whole = MixtureBatchSampler(data, 4, True, True)
    it = iter(whole)
    expected = [next(it) for _ in range(100)]

    torch.manual_seed(1)
    first = MixtureBatchSampler(data, 4, True, True)
    it = iter(first)
    head = [next(it) for _ in range(37)]
    state, seed = json.loads(json.dumps(first.state())), first.seed  # what a checkpoint stores

    torch.manual_seed(99)  # another global RNG state: the saved state alone decides the windows
    again = MixtureBatchSampler(data, 4, True, True)
    again.load_state(state)
    again.resume(seed, 37 * 4)
    it = iter(again)
    assert head + [next(it) for _ in range(63)] == expected


def _prepared_halves(tmp_path: Path, verdict: Path) -> list[Path]:
    """The book's corpus cut into 60 documents, odd and even ones prepared as two sources."""
    text = verdict.read_text(encoding="utf-8")
    step = len(text) // 60
    docs = [text[i : i + step] for i in range(0, len(text), step)]
    roots = []
    for k, name in enumerate(("even", "odd")):
        src = tmp_path / f"{name}.jsonl"
        src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[k::2]), encoding="utf-8")
        prepare([src], tmp_path / name, val_ratio=0.2)
        roots.append(tmp_path / name)
    return roots


def _mixture_config(roots: list[Path], **overrides):
    return load_config(CONFIGS / "tiny.yaml", {
        "data.path": [{"path": str(roots[0]), "weight": 0.7}, {"path": str(roots[1]), "weight": 0.3}],
        "train.max_new_tokens": 0, **overrides})


def test_mixture_training_stopped_and_resumed_equals_an_uninterrupted_run(tmp_path, verdict):
    """issue 16 acceptance: stop + --resume gives the same windows (hence losses and weights)."""
    roots = _prepared_halves(tmp_path, verdict)
    common = {"train.save_freq": 3, "train.eval_freq": 4, "train.eval_iter": 1}  # evaluations at steps 1 and 5
    train(_mixture_config(roots, **common, **{"train.max_steps": 6}), tmp_path / "whole")
    train(_mixture_config(roots, **common, **{"train.max_steps": 3}), tmp_path / "cut")
    train(_mixture_config(roots, **common, **{"train.max_steps": 6}), tmp_path / "cut", resume=True)
    # The cut run also evaluated its final weights at step 3 (issue 12 finding 13): an extra record,
    # not a different trajectory; every record the uninterrupted run has must be equal.
    cut_records = [r for r in run_losses(tmp_path / "cut") if r[:2] != ("eval", 3)]
    assert cut_records == run_losses(tmp_path / "whole")
    whole, cut = final_weights(tmp_path / "whole"), final_weights(tmp_path / "cut")
    for key in whole:
        assert torch.equal(whole[key], cut[key]), key


def test_mixture_reports_validation_loss_per_source_and_weighted_overall(tmp_path, verdict):
    roots = _prepared_halves(tmp_path, verdict)
    train(_mixture_config(roots, **{"train.max_steps": 1}), tmp_path / "run")
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in events if e["event"] == "eval"]
    assert evals
    by_source = evals[0]["val_loss_by_source"]
    assert set(by_source) == {str(r) for r in roots}
    expected = 0.7 * by_source[str(roots[0])] + 0.3 * by_source[str(roots[1])]
    assert evals[0]["val_loss"] == pytest.approx(expected, rel=1e-12)  # the same floats summed: rounding only


def test_eval_of_a_mixture_checkpoint_reports_each_source_and_the_weighted_overall_as_training_did(cli, tmp_path,
                                                                                                     verdict):
    roots = _prepared_halves(tmp_path, verdict)
    # eval_iter large: the final evaluation covers every validation window, as eval does
    train(_mixture_config(roots, **{"train.max_steps": 2, "train.eval_iter": 10**6}), tmp_path / "run")
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    final = [e for e in events if e["event"] == "eval"][-1]
    r = cli("eval", "--checkpoint", tmp_path / "run", "--json")
    assert r.exit_code == 0, r.stderr
    rows = {row["dataset"]: row for row in json.loads(r.stdout)["results"]}
    assert list(rows) == [f"val ({roots[0]})", f"val ({roots[1]})", "val (mixture, weighted)"]
    for root in roots:  # same windows, same batches, same model: equal up to float32 summation order
        assert rows[f"val ({root})"]["loss"] == pytest.approx(final["val_loss_by_source"][str(root)], rel=1e-6)
    assert rows["val (mixture, weighted)"]["loss"] == pytest.approx(final["val_loss"], rel=1e-6)


def _write_config(tmp_path: Path, entries: list) -> Path:
    path = tmp_path / "mix.yaml"
    path.write_text(json.dumps({"data": {"path": entries}, "train": {"max_steps": 1}}))  # JSON is YAML
    return path


def test_mixture_errors_are_one_line(cli, tmp_path, verdict, monkeypatch):
    roots = _prepared_halves(tmp_path, verdict)
    good = {"path": str(roots[0]), "weight": 1}
    for weight in (0, -0.5):
        cfg = _write_config(tmp_path, [good, {"path": str(roots[1]), "weight": weight}])
        _one_line_error(cli("train", "--config", cfg, "--out", tmp_path / "r"), "data.path[1].weight", "must be positive")
    cfg = _write_config(tmp_path, [good, {"path": str(tmp_path / "nowhere"), "weight": 1}])
    _one_line_error(cli("train", "--config", cfg, "--out", tmp_path / "r"), "data.path[1]", "nowhere", "not found")
    cfg = _write_config(tmp_path, [good, {"path": str(verdict), "weight": 1}])
    _one_line_error(cli("train", "--config", cfg, "--out", tmp_path / "r"), "data.path[1]", "not a directory made by gptcli prepare")

    from test_sources import _WideVocabulary

    monkeypatch.setattr(shards, "get_tokenizer", lambda: _WideVocabulary(100277))
    prepare([tmp_path / "odd.jsonl"], tmp_path / "wide", val_ratio=0.2)
    cfg = _write_config(tmp_path, [good, {"path": str(tmp_path / "wide"), "weight": 1}])
    _one_line_error(cli("train", "--config", cfg, "--out", tmp_path / "r"), "different token widths", "uint16", "uint32")
    assert not (tmp_path / "r").exists()


def test_a_mixture_listing_one_corpus_twice_is_refused_naming_both_entries(cli, tmp_path, verdict):
    """It trained: its per-source losses merged under one name (loss showed one row, eval two) and the corpus'
    windows were walked twice per epoch."""
    roots = _prepared_halves(tmp_path, verdict)
    again = tmp_path / "." / roots[0].name  # another spelling of the same folder
    cfg = _write_config(tmp_path, [{"path": str(roots[0]), "weight": 3}, {"path": str(roots[1]), "weight": 1},
                                   {"path": str(again), "weight": 1}])
    _one_line_error(cli("train", "--config", cfg, "--out", tmp_path / "r"), "data.path[2]", "the same corpus as data.path[0]")
    assert not (tmp_path / "r").exists()


def test_resuming_a_mixture_run_on_a_single_source_is_refused(tmp_path, verdict):
    """A mixture checkpoint holds one position per source: a single data.path on resume would drop them silently."""
    from gptcli.errors import InputError

    roots = _prepared_halves(tmp_path, verdict)
    train(_mixture_config(roots, **{"train.max_steps": 2}), tmp_path / "run")
    single = load_config(CONFIGS / "tiny.yaml", {"data.path": str(roots[0]), "train.max_new_tokens": 0,
                                                 "train.max_steps": 4})
    for allow in (False, True):  # even when a changed corpus is allowed, the positions cannot carry over
        with pytest.raises(InputError, match="trained on a mixture .* single source"):
            train(single, tmp_path / "run", resume=True, allow_data_change=allow)


def test_a_mixture_resumed_with_new_weights_and_allow_data_change_keeps_its_windows_and_continues(tmp_path, verdict):
    """README: --allow-data-change continues when the corpus has as many training windows. The run's count was taken
    from its summed tokens as one stream, not from each source's windows: a reweighted mixture, the very same
    windows, was refused ("has 153 windows, the run's corpus had 154")."""
    roots = _prepared_halves(tmp_path, verdict)
    ctx = 28  # 2022 and 2296 training tokens: 72 + 81 windows of 28, where 4318 tokens as one stream give 154
    tokens = [json.loads((r / "index.json").read_text())["splits"]["train"]["tokens"] for r in roots]
    sizes = [len(range(0, n - ctx, ctx)) for n in tokens]
    assert len(range(0, sum(tokens) - ctx, ctx)) != sum(sizes)  # the case: one stream's count is not the sum
    train(_mixture_config(roots, **{"train.max_steps": 2, "model.context_length": ctx}), tmp_path / "run")
    reweighted = load_config(CONFIGS / "tiny.yaml", {
        "data.path": [{"path": str(roots[0]), "weight": 0.5}, {"path": str(roots[1]), "weight": 0.5}],
        "model.context_length": ctx, "train.max_new_tokens": 0, "train.max_steps": 3})
    train(reweighted, tmp_path / "run", resume=True, allow_data_change=True)
    manifest = json.loads((tmp_path / "run" / "run.json").read_text())
    assert manifest["corpus"]["path"].endswith(": 0.5)") and manifest["corpus"]["train_windows"] == sum(sizes)
    assert (tmp_path / "run" / "step-000003").is_dir()


def test_loss_of_a_mixture_checkpoint_weighs_its_sources_as_training_did(cli, tmp_path, verdict):
    """`loss` walked the joined windows in order, source after source: its val row was neither
    training's weighted val_loss nor eval's, and with --eval-iter it was the first source alone."""
    roots = _prepared_halves(tmp_path, verdict)
    train(_mixture_config(roots, **{"train.max_steps": 2, "train.eval_iter": 10**6}), tmp_path / "run")
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    final = [e for e in events if e["event"] == "eval"][-1]
    r = cli("loss", "--checkpoint", tmp_path / "run", "--json")
    assert r.exit_code == 0, r.stderr
    rows = json.loads(r.stdout)
    assert rows["val"]["loss"] == pytest.approx(final["val_loss"], rel=1e-6)
    for root in roots:
        assert rows["by_source"][str(root)]["val"]["loss"] == pytest.approx(final["val_loss_by_source"][str(root)],
                                                                            rel=1e-6)
    one = json.loads(cli("loss", "--checkpoint", tmp_path / "run", "--eval-iter", "1", "--json").stdout)
    first, second = (one["by_source"][str(root)] for root in roots)
    for split in ("train", "val"):  # one batch of each source, weighed 0.7 / 0.3
        assert one[split]["loss"] == pytest.approx(0.7 * first[split]["loss"] + 0.3 * second[split]["loss"], rel=1e-12)
        assert one[split]["batches"] == 2
    table = cli("loss", "--checkpoint", tmp_path / "run").stdout
    assert "val (mixture, weighted)" in table and f"train ({roots[1]})" in table


def test_huge_mixture_weights_are_proportions_not_an_overflow(tmp_path, verdict):
    """Weights 1e308 and 1e308 mean half and half: the weighted loss was inf / inf = nan."""
    roots = _prepared_halves(tmp_path, verdict)
    for name, weight in (("huge", 1e308), ("one", 1.0)):
        cfg = load_config(CONFIGS / "tiny.yaml", {
            "data.path": [{"path": str(r), "weight": weight} for r in roots], "train.max_new_tokens": 0,
            "train.max_steps": 2, "train.eval_iter": 1})
        train(cfg, tmp_path / name)
    assert run_losses(tmp_path / "huge") == run_losses(tmp_path / "one")
    assert all(math.isfinite(v) for record in run_losses(tmp_path / "huge") for v in record[2:5] if v is not None)


def test_train_ratio_asked_for_a_prepared_corpus_is_refused_naming_it(cli, tmp_path, verdict):
    """A prepared corpus keeps prepare's split: data.train_ratio was silently ignored (and listed
    by `gptcli runs` as if used). Asked for, it is refused by name; the shipped configs' 0.90
    (the default) is no request and trains."""
    roots = _prepared_halves(tmp_path, verdict)
    mixture = "data.path=[" + ", ".join(f"{{path: {r}, weight: 1}}" for r in roots) + "]"
    for data in (["--set", f"data.path={roots[0]}"], ["--set", mixture]):
        for command in (["train", "--out", str(tmp_path / "r"), "--max-steps", "1"], ["plan", "--probe-steps", "0"]):
            r = cli(*command, "--config", CONFIGS / "tiny.yaml", *data, "--set", "data.train_ratio=0.5")
            _one_line_error(r, "data.train_ratio 0.5 (from --set) does not apply", "--val-ratio")
            assert not (tmp_path / "r").exists()
    r = cli("train", "--config", CONFIGS / "tiny.yaml", "--data", roots[0], "--out", tmp_path / "ok", "--max-steps", "1")
    assert r.exit_code == 0, r.stderr
