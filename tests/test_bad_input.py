"""The bad-input matrix: every command, every kind of input, the malformed cases users meet.

Each case must end with the expected exit code (2 bad input, 1 runtime failure), exactly one
line on stderr that names the thing and the problem, no traceback, nothing on stdout, and no
file created, changed or removed. The terminal summary prints how many cases ran.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import CONFIGS

TINY = str(CONFIGS / "tiny.yaml")


def _copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _refresh_manifest(ckpt: Path, name: str) -> None:
    """Make the manifest agree with a tampered file, so the check behind it is what must object."""
    manifest = json.loads((ckpt / "manifest.json").read_text())
    f = ckpt / name
    manifest["files"][name] = {"sha256": hashlib.sha256(f.read_bytes()).hexdigest(), "bytes": f.stat().st_size}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def assets(tmp_path_factory, request):
    """Files every case can point at: good and broken checkpoints, configs, corpora, prompts."""
    from gptcli.config import load_config
    from gptcli.train import train

    verdict = Path(request.config.rootpath).parent / "shared" / "data" / "the-verdict.txt"
    a = tmp_path_factory.mktemp("assets")
    base = {"data.path": str(verdict), "train.device": "cpu", "train.save_freq": 1, "train.max_new_tokens": 0,
            "train.max_steps": 2}
    train(load_config(TINY, base), a / "run")
    train(load_config(TINY, {**base, "model.n_layers": 1, "train.max_steps": 1}), a / "other")
    good = a / "run" / "step-000002"
    p = {"verdict": verdict, "run": a / "run", "good": good, "other": a / "other"}

    p["no_manifest"] = _copy_checkpoint(good, a / "no_manifest")
    (p["no_manifest"] / "manifest.json").unlink()
    p["truncated"] = _copy_checkpoint(good, a / "truncated")
    w = p["truncated"] / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-1000])
    p["flipped"] = _copy_checkpoint(good, a / "flipped")
    w = p["flipped"] / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[len(data) // 2] ^= 0x10
    w.write_bytes(bytes(data))
    p["evil_config"] = _copy_checkpoint(good, a / "evil_config")
    (p["evil_config"] / "config.yaml").write_text("!!python/object/apply:os.system ['touch pwned']\n")
    _refresh_manifest(p["evil_config"], "config.yaml")
    p["bad_manifest"] = _copy_checkpoint(good, a / "bad_manifest")
    (p["bad_manifest"] / "manifest.json").write_text("{not json")
    p["garbage_weights"] = _copy_checkpoint(good, a / "garbage_weights")
    (p["garbage_weights"] / "model.safetensors").write_bytes(b"\x00" * 64)
    _refresh_manifest(p["garbage_weights"], "model.safetensors")
    p["empty_dir"] = a / "empty_dir"
    p["empty_dir"].mkdir()
    p["no_metrics"] = a / "no_metrics"
    p["no_metrics"].mkdir()
    (p["no_metrics"] / "notes.txt").write_text("a run without metrics")

    configs = {
        "cfg_empty": "",
        "cfg_invalid": "model:\n  emb_dim: [768\n",
        "cfg_unknown_key": "model:\n  emb_dimm: 768\n",
        "cfg_unknown_section": "optimizer:\n  lr: 0.1\n",
        "cfg_wrong_type": "model:\n  n_layers: twelve\n",
        "cfg_bool_type": "model:\n  qkv_bias: maybe\n",
        "cfg_heads": "model:\n  emb_dim: 100\n  n_heads: 12\n",
        "cfg_negative": "model:\n  n_layers: -2\n",
        "cfg_zero_ctx": "model:\n  context_length: 0\n",
        "cfg_dropout": "model:\n  drop_rate: 1.5\n",
        "cfg_gelu": "model:\n  gelu: relu\n",
        "cfg_list": "- model\n- train\n",
        "cfg_lr": "train:\n  learning_rate: -0.1\n",
        "cfg_ratio": "data:\n  train_ratio: 1.0\n",
        "cfg_sampling": "data:\n  sampling: shuffled\n",
        "cfg_section_scalar": "model: 12\n",
    }
    for name, text in configs.items():
        p[name] = a / f"{name}.yaml"
        p[name].write_text(text)
    p["cfg_binary"] = a / "cfg_binary.yaml"
    p["cfg_binary"].write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe")

    texts = {"empty_txt": b"", "blank_txt": b"\n\n   \n", "binary_txt": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe",
             "latin1_txt": "caf\xe9 cr\xe8me br\xfbl\xe9e".encode("latin-1") * 50,
             "short_txt": b"A few words only, far from one window of thirty-two tokens."}
    for name, content in texts.items():
        p[name] = a / f"{name}.txt"
        p[name].write_bytes(content)
    p["val_short_txt"] = a / "val_short.txt"
    p["val_short_txt"].write_text("Enough words for training but a validation split that is far too short. " * 4)
    p["prompts_empty"] = a / "prompts_empty.txt"
    p["prompts_empty"].write_text("\n  \n")
    p["prompts_binary"] = a / "prompts_binary.txt"
    p["prompts_binary"].write_bytes(b"\xff\xfe\x00\x01")

    p["jsonl_nofield"] = a / "nofield.jsonl"
    p["jsonl_nofield"].write_text('{"text": "fine"}\n{"body": "no text field here"}\n')
    p["jsonl_invalid"] = a / "invalid.jsonl"
    p["jsonl_invalid"].write_text('{"text": "fine"}\n{"text": unquoted}\n')
    p["gz_damaged"] = a / "damaged.txt.gz"
    packed = gzip.compress(verdict.read_bytes())
    p["gz_damaged"].write_bytes(packed[: len(packed) // 2])  # cut mid-stream
    p["prepare_out_file"] = a / "prepare_out_file"
    p["prepare_out_file"].write_text("a file, not a folder")

    p["hf_none"] = a / "hf_none"
    p["hf_none"].mkdir()
    (p["hf_none"] / "weights.bin").write_bytes(b"\x00" * 10)
    p["hf_truncated"] = a / "hf_truncated"
    p["hf_truncated"].mkdir()
    from safetensors.torch import save_file

    (p["hf_truncated"] / "config.json").write_text(json.dumps(
        {"model_type": "gpt2", "n_embd": 32, "n_head": 4, "n_layer": 1, "n_positions": 32, "vocab_size": 50257}))
    save_file({"wte.weight": torch.zeros(50257, 32)}, str(p["hf_truncated"] / "model.safetensors"))
    f = p["hf_truncated"] / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    p["evil_pth"] = a / "evil.pth"

    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    torch.save({"tok_emb.weight": torch.zeros(2, 2), "x": Evil()}, p["evil_pth"])
    p["exported"] = a / "exported"
    p["exported"].mkdir()
    (p["exported"] / "keep.txt").write_text("existing export")
    return p


# (id, argv with {asset} placeholders, exit code, words the one stderr line must contain)
CASES = [
    # ---- config files (shared by every command that takes --config)
    ("config-missing", "train --config {a}/nope.yaml", 2, ["nope.yaml"]),
    ("config-directory", "loss --config {empty_dir}", 2, ["empty_dir"]),
    ("config-empty", "train --config {cfg_empty} --data {verdict}", 2, ["cfg_empty.yaml", "empty"]),
    ("config-invalid-yaml", "train --config {cfg_invalid} --data {verdict}", 2, ["cfg_invalid.yaml", "invalid YAML"]),
    ("config-binary", "loss --config {cfg_binary}", 2, ["cfg_binary.yaml", "UTF-8"]),
    ("config-unknown-key", "train --config {cfg_unknown_key}", 2, ["model.emb_dimm", "unknown key"]),
    ("config-unknown-section", "loss --config {cfg_unknown_section}", 2, ["optimizer", "unknown section"]),
    ("config-wrong-type", "generate hi --config {cfg_wrong_type}", 2, ["model.n_layers", "integer"]),
    ("config-bool-type", "train --config {cfg_bool_type}", 2, ["model.qkv_bias", "true or false"]),
    ("config-heads", "train --config {cfg_heads}", 2, ["model.emb_dim", "n_heads"]),
    ("config-negative", "eval --config {cfg_negative} --data {verdict} --no-val", 2, ["model.n_layers", "positive"]),
    ("config-zero-context", "train --config {cfg_zero_ctx}", 2, ["model.context_length", "positive"]),
    ("config-dropout", "train --config {cfg_dropout}", 2, ["model.drop_rate", "[0, 1)"]),
    ("config-gelu-choice", "loss --config {cfg_gelu}", 2, ["model.gelu", "exact"]),
    ("config-not-a-mapping", "train --config {cfg_list}", 2, ["cfg_list.yaml", "mapping"]),
    ("config-section-scalar", "train --config {cfg_section_scalar}", 2, ["model", "mapping"]),
    ("config-learning-rate", "train --config {cfg_lr}", 2, ["train.learning_rate", "positive"]),
    ("config-train-ratio", "loss --config {cfg_ratio}", 2, ["data.train_ratio", "(0, 1)"]),
    ("config-sampling-choice", "train --config {cfg_sampling}", 2, ["data.sampling", "sliding"]),
    ("set-no-equals", "train --config {tiny} --set train.max_steps", 2, ["--set", "section.key=value"]),
    ("set-unknown-key", "train --config {tiny} --set train.max_step=3", 2, ["train.max_step", "unknown key"]),
    ("set-unknown-section", "loss --config {tiny} --set trainer.seed=1", 2, ["trainer", "unknown section"]),
    ("set-bad-value", "train --config {tiny} --set train.batch_size=many", 2, ["train.batch_size", "integer"]),
    ("set-no-section", "train --config {tiny} --set seed=1", 2, ["seed", "section.key"]),
    # ---- data files and folders
    ("data-missing", "train --config {tiny} --data {a}/missing.txt", 2, ["missing.txt", "not found"]),
    ("data-empty", "train --config {tiny} --data {empty_txt}", 2, ["empty_txt.txt", "empty"]),
    ("data-blank", "loss --config {tiny} --data {blank_txt}", 2, ["blank_txt.txt", "empty"]),
    ("data-binary", "train --config {tiny} --data {binary_txt}", 2, ["binary_txt.txt", "not UTF-8"]),
    ("data-latin1", "loss --config {tiny} --data {latin1_txt}", 2, ["latin1_txt.txt", "not UTF-8"]),
    ("data-too-short", "train --config {tiny} --data {short_txt}", 2, ["short_txt.txt", "training split", "needs 33"]),
    ("data-val-too-short", "loss --config {tiny} --data {val_short_txt}", 2, ["validation split", "needs 33"]),
    ("data-empty-folder", "train --config {tiny} --data {empty_dir}", 2, ["empty_dir", "no .txt"]),
    ("data-batch-too-big", "train --config {tiny} --data {verdict} --batch-size 1000", 2, ["window", "batch_size 1000"]),
    ("eval-data-missing", "eval --checkpoint {good} --data {a}/missing.txt --no-val", 2, ["missing.txt", "not found"]),
    ("eval-data-binary", "eval --checkpoint {good} --data {binary_txt} --no-val", 2, ["binary_txt.txt", "not UTF-8"]),
    ("eval-data-empty", "eval --checkpoint {good} --data {empty_txt} --no-val", 2, ["empty_txt.txt", "empty"]),
    ("eval-nothing-to-do", "eval --checkpoint {good} --no-val", 2, ["--no-val", "--data"]),
    ("eval-show-tokens-alone", "eval --checkpoint {good} --show-tokens", 2, ["--show-tokens", "--text"]),
    ("eval-text-empty", "eval --checkpoint {good} --text ''", 2, ["--text"]),
    # ---- prepare inputs
    ("prepare-no-inputs", "prepare --out {a}/p1", 2, ["inputs"]),
    ("prepare-missing-input", "prepare {a}/missing.txt --out {a}/p2", 2, ["missing.txt"]),
    ("prepare-empty-folder", "prepare {empty_dir} --out {a}/p3", 2, ["empty_dir"]),
    ("prepare-jsonl-no-field", "prepare {jsonl_nofield} --out {a}/p4", 2, ["nofield.jsonl:2", "text"]),
    ("prepare-jsonl-invalid", "prepare {jsonl_invalid} --out {a}/p5", 2, ["invalid.jsonl:2"]),
    ("prepare-gzip-damaged", "prepare {gz_damaged} --out {a}/p6", 2, ["damaged.txt.gz"]),
    ("prepare-latin1", "prepare {latin1_txt} --out {a}/p7", 2, ["latin1_txt.txt", "UTF-8"]),
    ("prepare-val-ratio", "prepare {verdict} --out {a}/p8 --val-ratio 1.0", 2, ["--val-ratio"]),
    ("prepare-workers", "prepare {verdict} --out {a}/p9 --workers 0", 2, ["--workers"]),
    ("prepare-out-is-file", "prepare {verdict} --out {prepare_out_file}", 2, ["prepare_out_file"]),
    # ---- numeric flags
    ("train-max-steps-zero", "train --config {tiny} --max-steps 0", 2, ["--max-steps"]),
    ("train-batch-negative", "train --config {tiny} --batch-size -1", 2, ["--batch-size"]),
    ("train-epochs-text", "train --config {tiny} --num-epochs ten", 2, ["--num-epochs"]),
    ("train-lr-negative", "train --config {tiny} --data {verdict} --learning-rate -1", 2, ["learning_rate"]),
    ("train-nproc-zero", "train --config {tiny} --nproc 0", 2, ["--nproc"]),
    ("gen-max-new-negative", "generate hi --checkpoint {good} --max-new-tokens -5", 2, ["--max-new-tokens"]),
    ("gen-temperature-negative", "generate hi --checkpoint {good} --temperature -1", 2, ["--temperature"]),
    ("gen-top-k-zero", "generate hi --checkpoint {good} --top-k 0", 2, ["--top-k"]),
    ("gen-top-k-too-big", "generate hi --checkpoint {good} --top-k 50258", 2, ["--top-k", "50257"]),
    ("gen-top-p-zero", "generate hi --checkpoint {good} --top-p 0", 2, ["--top-p"]),
    ("gen-top-p-above-one", "generate hi --checkpoint {good} --top-p 1.5", 2, ["--top-p"]),
    ("gen-num-samples-zero", "generate hi --checkpoint {good} --num-samples 0", 2, ["--num-samples"]),
    ("loss-eval-iter-zero", "loss --checkpoint {good} --eval-iter 0", 2, ["--eval-iter"]),
    ("eval-batch-size-zero", "eval --checkpoint {good} --batch-size 0", 2, ["--batch-size"]),
    ("prepare-shard-mb-zero", "prepare {verdict} --out {a}/p10 --shard-mb 0", 2, ["--shard-mb"]),
    # ---- prompts
    ("prompt-empty", "generate '' --checkpoint {good}", 2, ["prompt", "empty"]),
    ("prompt-missing", "generate --checkpoint {good}", 2, ["prompt"]),
    ("prompts-file-missing", "generate --checkpoint {good} --prompts-file {a}/nope.txt", 2, ["nope.txt"]),
    ("prompts-file-binary", "generate --checkpoint {good} --prompts-file {prompts_binary}", 2, ["prompts_binary.txt"]),
    ("prompts-file-blank", "generate --checkpoint {good} --prompts-file {prompts_empty}", 2, ["prompts_empty.txt", "no prompts"]),
    ("prompts-file-directory", "generate --checkpoint {good} --prompts-file {empty_dir}", 2, ["empty_dir"]),
    # ---- checkpoints
    ("ckpt-missing-generate", "generate hi --checkpoint {a}/nope", 1, ["nope", "no such"]),
    ("ckpt-missing-eval", "eval --checkpoint {a}/nope", 1, ["nope"]),
    ("ckpt-missing-loss", "loss --checkpoint {a}/nope", 1, ["nope"]),
    ("ckpt-no-manifest", "generate hi --checkpoint {no_manifest}", 1, ["no_manifest", "manifest.json"]),
    ("ckpt-bad-manifest", "loss --checkpoint {bad_manifest}", 1, ["bad_manifest", "manifest"]),
    ("ckpt-truncated", "generate hi --checkpoint {truncated}", 1, ["model.safetensors", "truncated"]),
    ("ckpt-flipped-byte", "eval --checkpoint {flipped}", 1, ["model.safetensors", "sha256"]),
    ("ckpt-garbage-weights", "generate hi --checkpoint {garbage_weights}", 1, ["model.safetensors", "cannot read"]),
    ("ckpt-yaml-code", "generate hi --checkpoint {evil_config}", 1, ["config.yaml"]),
    ("ckpt-empty-run", "generate hi --checkpoint {empty_dir}", 1, ["empty_dir", "no complete checkpoint"]),
    ("export-corrupt", "export {flipped} {a}/out-hf", 1, ["sha256"]),
    ("export-exists", "export {good} {exported}", 2, ["exported", "keep.txt"]),  # not an export: --overwrite would not help
    ("export-format", "export {good} {a}/out-x --format onnx", 2, ["--format"]),
    ("init-from-missing", "train --config {tiny} --data {verdict} --init-from {a}/nope --out {a}/r1", 1, ["nope"]),
    ("init-from-other-shape", "train --config {tiny} --data {verdict} --init-from {other} --out {a}/r2", 2, ["n_layers 1 vs 2"]),
    ("resume-other-shape", "train --out {run} --resume --data {verdict} --set model.n_layers=3", 2, ["n_layers 2 vs 3"]),
    ("plan-context-beyond-a-tensor", "plan --config {tiny} --set model.context_length=1000000000000", 1,
     ["model.context_length 1000000000000 (from --set)", "causal mask"]),
    ("plan-window-beyond-memory",  # the T x T mask: more bytes than an address space; small rows for the rest
     "plan --config {tiny} --set model.context_length=20000000 --set model.emb_dim=4 --set model.n_heads=1", 1,
     ["model.context_length 20000000 (from --set)", "one window does not fit cpu"]),
    ("vocab-below-tokenizer", "train --config {tiny} --data {verdict} --set model.vocab_size=100 --out {a}/v", 2,
     ["model.vocab_size 100 (from --set)", "50257"]),
    ("resume-nothing", "train --config {tiny} --data {verdict} --out {empty_dir} --resume", 2, ["--resume"]),
    ("run-exists", "train --config {tiny} --data {verdict} --out {run}", 2, ["--resume", "--overwrite"]),
    ("eval-all-no-checkpoints", "eval --checkpoint {empty_dir} --all", 1, ["empty_dir"]),
    # ---- paths, names and choices
    ("name-escapes", "train --config {tiny} --data {verdict} --name ../escape", 2, ["--name", "../escape"]),
    ("name-hidden", "train --config {tiny} --data {verdict} --name .hidden", 2, ["--name"]),
    ("out-and-name", "train --config {tiny} --data {verdict} --name x --out {a}/y", 2, ["--out", "--name"]),
    ("out-not-writable", "train --config {tiny} --data {verdict} --out {prepare_out_file}/run", 2, ["not writable"]),
    ("plot-no-metrics", "plot {no_metrics}", 2, ["no_metrics", "metrics.jsonl"]),
    ("plot-missing", "plot {a}/nope", 2, ["nope"]),
    ("import-missing", "import {a}/nope", 2, ["nope"]),
    ("import-no-format", "import {hf_none}", 2, ["hf_none", "config.json"]),
    ("import-truncated-safetensors", "import {hf_truncated}", 1, ["model.safetensors"]),
    ("import-code-pickle", "import {evil_pth}", 2, ["evil.pth", "refused"]),
    ("download-unknown", "download gpt5", 2, ["gpt5", "gpt2-small"]),
    ("download-source", "download gpt2-small --source torrent", 2, ["--source"]),
    ("device-unknown", "generate hi --checkpoint {good} --device tpu", 2, ["--device", "tpu"]),
    ("device-absent", "loss --config {tiny} --data {verdict} --device mps", 2, ["--device", "mps"]),
    ("unknown-command", "fly", 2, ["fly"]),
    ("unknown-option", "train --speed 11", 2, ["--speed"]),
]


def _snapshot(*roots: Path) -> dict:
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for root in roots for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("case_id, argv, code, words", CASES, ids=[c[0] for c in CASES])
def test_bad_input(cli, assets, tmp_path, case_id, argv, code, words):
    import shlex

    names = {k: str(v) for k, v in assets.items()}
    names.update(a=str(assets["good"].parents[1]), tiny=TINY)
    args = [arg.format(**names) for arg in shlex.split(argv)]
    before = _snapshot(assets["good"].parents[1], tmp_path)
    result = cli(*args)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == code, result.stderr
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    for word in words:
        assert word.format(**names) in lines[0], (word, lines[0])
    assert _snapshot(assets["good"].parents[1], tmp_path) == before, "a file was created, changed or removed"


def test_the_matrix_is_large_enough():
    assert len(CASES) >= 60
    assert len({c[0] for c in CASES}) == len(CASES)
    commands = {c[1].split()[0] for c in CASES}
    assert {"train", "loss", "eval", "generate", "plot", "download", "import", "export", "prepare"} <= commands
