"""GPT-2 weights in and out: Hugging Face, OpenAI's TensorFlow files and the book's .pth,
checked against transformers' GPT-2 and the book's GPTModel, and used by every command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from conftest import CONFIGS, book_model, tiny_model_config, FIXTURES
from gptcli.checkpoint import load_checkpoint
from gptcli.model import GPTModel, load_state_dict

PROMPT = "Every effort moves you"


def random_hf_model(seed: int = 0, **config) -> "transformers.GPT2LMHeadModel":
    """A transformers GPT-2 with every parameter drawn at a scale where any mix-up shows in the logits."""
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name.endswith("ln_f.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0, 0.2)
    return model


SHAPES = {
    # GPT-2's own context, tied head, tanh GELU (the released models' settings at a tiny width)
    "ctx1024-tied": dict(vocab_size=50257, n_positions=1024, n_embd=32, n_layer=2, n_head=4),
    # another context, an untied head and the exact GELU
    "ctx48-untied": dict(vocab_size=50257, n_positions=48, n_embd=24, n_layer=3, n_head=3,
                         activation_function="gelu", tie_word_embeddings=False),
}


def our_model(path: Path) -> GPTModel:
    ckpt = load_checkpoint(path)
    model = GPTModel(ckpt.config.model)
    load_state_dict(model, ckpt.weights)
    return model.eval()


def tokens(n: int, vocab: int = 50257, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (2, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", SHAPES)
def test_hf_import_gives_transformers_logits(cli, tmp_path, shape, no_network):
    hf = random_hf_model(**SHAPES[shape])
    hf.save_pretrained(tmp_path / "hf")
    r = cli("import", tmp_path / "hf", "--out", tmp_path / "ckpt")
    assert r.exit_code == 0, r.stderr
    assert r.stdout.strip() == str(tmp_path / "ckpt")
    model = our_model(tmp_path / "ckpt")
    cfg = model.cfg
    assert (cfg.context_length, cfg.emb_dim, cfg.n_layers, cfg.n_heads, cfg.qkv_bias) == (
        SHAPES[shape]["n_positions"], SHAPES[shape]["n_embd"], SHAPES[shape]["n_layer"], SHAPES[shape]["n_head"], True)
    x = tokens(min(cfg.context_length, 64))
    with torch.no_grad():
        # our layers vs transformers' GPT-2 on the same weights: float32 rounding of O(100) logits
        torch.testing.assert_close(model(x), hf(x).logits, atol=1e-4, rtol=0)
    manifest = json.loads((tmp_path / "ckpt" / "manifest.json").read_text())
    assert manifest["source"]["format"] == "huggingface" and manifest["pretrained"] == "hf"


def test_pytorch_model_bin_imports_too(cli, tmp_path):
    hf = random_hf_model(**SHAPES["ctx48-untied"])
    (tmp_path / "hf").mkdir()
    hf.config.save_pretrained(tmp_path / "hf")
    # The legacy (pre-zip) serialization of torch < 1.6, which older .bin files on the hub use.
    torch.save(hf.state_dict(), tmp_path / "hf" / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    r = cli("import", tmp_path / "hf")  # default --out: checkpoints/pretrained/<name>
    assert r.exit_code == 0, r.stderr
    model = our_model(Path("checkpoints/pretrained/hf"))
    x = tokens(16)
    with torch.no_grad():
        # our layers vs transformers' GPT-2 on the same weights: float32 rounding of O(100) logits
        torch.testing.assert_close(model(x), hf(x).logits, atol=1e-4, rtol=0)


def test_sharded_safetensors_import(cli, tmp_path):
    hf = random_hf_model(**SHAPES["ctx48-untied"])
    hf.save_pretrained(tmp_path / "hf", max_shard_size="1MB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    assert cli("import", tmp_path / "hf", "--out", tmp_path / "ckpt").exit_code == 0
    x = tokens(16)
    with torch.no_grad():
        # our layers vs transformers' GPT-2 on the same weights: float32 rounding of O(100) logits
        torch.testing.assert_close(our_model(tmp_path / "ckpt")(x), hf(x).logits, atol=1e-4, rtol=0)


def test_export_of_a_trained_checkpoint_loads_in_transformers(cli, verdict, tmp_path):
    r = cli("train", "--config", CONFIGS / "tiny.yaml", "--data", verdict, "--max-steps", "3", "--out", tmp_path / "run", "--device", "cpu")
    assert r.exit_code == 0, r.stderr
    r = cli("export", tmp_path / "run", "--format", "hf", tmp_path / "hf")
    assert r.exit_code == 0, r.stderr
    ours = our_model(tmp_path / "run")
    assert ours.cfg.qkv_bias is False and ours.cfg.gelu == "exact"  # zero biases, "gelu"
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    assert hf.config.tie_word_embeddings is False
    x = tokens(ours.cfg.context_length)
    with torch.no_grad():
        # our layers vs transformers' GPT-2 on the same weights: float32 rounding of O(100) logits
        torch.testing.assert_close(hf(x).logits, ours(x), atol=1e-4, rtol=0)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    from gptcli.tokenizer import encode

    text = "Every effort moves you, naïve café <|endoftext|> 2024!!"
    assert tok(text)["input_ids"] == encode(text)


def test_import_then_export_round_trips_hf_weights(cli, tmp_path):
    hf = random_hf_model(**SHAPES["ctx1024-tied"])
    hf.save_pretrained(tmp_path / "hf")
    assert cli("import", tmp_path / "hf", "--out", tmp_path / "ckpt").exit_code == 0
    assert cli("export", tmp_path / "ckpt", tmp_path / "back").exit_code == 0
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "back", local_files_only=True).eval()
    x = tokens(40)
    with torch.no_grad():
        # our layers vs transformers' GPT-2 on the same weights: float32 rounding of O(100) logits
        torch.testing.assert_close(back(x).logits, hf(x).logits, atol=1e-4, rtol=0)
    r = cli("export", tmp_path / "ckpt", tmp_path / "back")
    assert r.exit_code == 2 and "--overwrite" in r.stderr


def test_openai_checkpoint_imports_without_tensorflow(cli, tmp_path):
    r = cli("import", FIXTURES / "openai-tiny", "--out", tmp_path / "ckpt")
    assert r.exit_code == 0, r.stderr
    ckpt = load_checkpoint(tmp_path / "ckpt")
    hp = json.loads((FIXTURES / "openai-tiny" / "hparams.json").read_text())
    cfg = ckpt.config.model
    assert (cfg.vocab_size, cfg.context_length, cfg.emb_dim, cfg.n_heads, cfg.n_layers) == (
        hp["n_vocab"], hp["n_ctx"], hp["n_embd"], hp["n_head"], hp["n_layer"])
    assert (cfg.qkv_bias, cfg.gelu) == (True, "tanh")
    tf = {k.replace(".", "/"): torch.from_numpy(v) for k, v in np.load(FIXTURES / "openai-tiny" / "expected.npz").items()}
    w, c = ckpt.weights, cfg.emb_dim
    assert torch.equal(w["tok_emb.weight"], tf["model/wte"]) and torch.equal(w["out_head.weight"], tf["model/wte"])
    assert torch.equal(w["trf_blocks.2.att.W_key.weight"], tf["model/h2/attn/c_attn/w"][0][:, c:2 * c].T)
    assert torch.equal(w["trf_blocks.1.ff.layers.2.weight"], tf["model/h1/mlp/c_proj/w"][0].T)
    assert torch.equal(w["final_norm.scale"], tf["model/ln_f/g"])
    # The whole mapping: transformers' GPT-2 holding the same values gives the same logits.
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=hp["n_vocab"], n_positions=hp["n_ctx"], n_embd=c, n_layer=hp["n_layer"], n_head=hp["n_head"])).eval()
    missing, _ = hf.load_state_dict({tf_to_hf_name(k): v.squeeze(0) for k, v in tf.items()}, strict=False)
    assert set(missing) <= {"lm_head.weight"}  # tied to wte
    x = tokens(hp["n_ctx"], vocab=hp["n_vocab"])
    with torch.no_grad():
        # our layers vs transformers' GPT-2 on the same weights: float32 rounding of O(100) logits
        torch.testing.assert_close(our_model(tmp_path / "ckpt")(x), hf(x).logits, atol=1e-4, rtol=0)


def tf_to_hf_name(name: str) -> str:
    """model/h2/attn/c_attn/w -> transformer.h.2.attn.c_attn.weight (OpenAI's names in transformers' port)."""
    parts = name.split("/")[1:]
    if parts[0][0] == "h" and parts[0][1:].isdigit():
        parts[:1] = ["h", parts[0][1:]]
    suffix = {"g": "weight", "b": "bias", "w": "weight"}
    parts = parts[:-1] + [suffix[parts[-1]]] if parts[-1] in suffix else parts + ["weight"]
    return "transformer." + ".".join(parts)


def test_book_pth_imports_and_gives_the_book_logits(cli, tmp_path):
    cfg = tiny_model_config(gelu="tanh", qkv_bias=True)
    book = book_model(cfg).eval()
    torch.save(book.state_dict(), tmp_path / "model.pth")
    r = cli("import", tmp_path / "model.pth")
    assert r.exit_code == 2 and "--n-heads" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    # heads that do not divide the width: the error names the flag given, not model.* keys (audit w2 #15)
    r = cli("import", tmp_path / "model.pth", "--n-heads", cfg.emb_dim + 1, "--out", tmp_path / "bad")
    assert r.exit_code == 2 and r.stderr.startswith(f"error: --n-heads {cfg.emb_dim + 1}:"), r.stderr
    assert "model.n_heads" not in r.stderr and not (tmp_path / "bad").exists()
    r = cli("import", tmp_path / "model.pth", "--n-heads", cfg.n_heads, "--out", tmp_path / "ckpt")
    assert r.exit_code == 0, r.stderr
    ours = our_model(tmp_path / "ckpt")
    assert ours.cfg.impl == "book"
    x = tokens(cfg.context_length)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), book(x), atol=0, rtol=0)


def one_line_error(r, code: int) -> str:
    assert r.exit_code == code, (r.exit_code, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert r.stdout == ""
    return lines[0]


def test_bad_sources_are_one_line_errors(cli, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hello")
    line = one_line_error(cli("import", tmp_path / "empty"), 2)
    assert "looked for" in line and "config.json" in line and "hparams.json" in line and ".pth" in line

    hf = random_hf_model(**SHAPES["ctx48-untied"])
    hf.save_pretrained(tmp_path / "hf")
    weights = tmp_path / "hf" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    line = one_line_error(cli("import", tmp_path / "hf"), 1)
    assert "model.safetensors" in line

    hf.save_pretrained(tmp_path / "hf2")
    config = json.loads((tmp_path / "hf2" / "config.json").read_text())
    config["n_positions"] = 64
    (tmp_path / "hf2" / "config.json").write_text(json.dumps(config))
    line = one_line_error(cli("import", tmp_path / "hf2"), 2)
    assert "wpe.weight" in line and "(48, 24)" in line and "(64, 24)" in line

    config.update(n_positions=48, model_type="llama")
    (tmp_path / "hf2" / "config.json").write_text(json.dumps(config))
    assert "only GPT-2" in one_line_error(cli("import", tmp_path / "hf2"), 2)


def test_imported_weights_serve_generate_eval_loss_and_train(cli, verdict, tmp_path):
    hf = random_hf_model(**dict(SHAPES["ctx48-untied"], n_positions=32))
    hf.save_pretrained(tmp_path / "hf")
    ckpt = tmp_path / "pretrained"
    assert cli("import", tmp_path / "hf", "--out", ckpt).exit_code == 0

    r = cli("generate", "--checkpoint", ckpt, PROMPT, "--max-new-tokens", "8", "--device", "cpu", "--json")
    assert r.exit_code == 0, r.stderr
    from gptcli.tokenizer import encode

    prompt = torch.tensor([encode(PROMPT)])
    want = hf.generate(prompt, max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(prompt),
                       pad_token_id=50256)
    assert json.loads(r.stdout)["samples"][0]["ids"] == want[0, prompt.shape[1]:].tolist()  # greedy: same tokens
    # The chapter's closing call, sampled: the same tokens as the book's generate() on the same weights.
    r = cli("generate", "--checkpoint", ckpt, PROMPT, "--temperature", "1.5", "--top-k", "50", "--seed", "123",
            "--max-new-tokens", "12", "--no-eos", "--device", "cpu", "--json")
    assert r.exit_code == 0, r.stderr
    from llms_from_scratch.ch05 import generate as book_generate

    cfg = load_checkpoint(ckpt).config.model
    book = book_model(cfg).eval()
    missing, unexpected = book.load_state_dict(load_checkpoint(ckpt).weights, strict=False)  # the book's names
    assert unexpected == [] and all(k.endswith(".att.mask") for k in missing)  # its causal masks are buffers
    torch.manual_seed(123)
    want = book_generate(book, prompt, max_new_tokens=12, context_size=cfg.context_length, top_k=50, temperature=1.5)
    assert json.loads(r.stdout)["samples"][0]["ids"] == want[0, prompt.shape[1]:].tolist()

    for args in (("eval", "--checkpoint", ckpt, "--data", verdict, "--no-val", "--eval-iter", "1"),
                 ("loss", "--checkpoint", ckpt, "--data", verdict, "--eval-iter", "1")):
        r = cli(*args, "--device", "cpu", "--json")
        assert r.exit_code == 0, r.stderr
        assert str(ckpt) in r.stdout

    r = cli("train", "--init-from", ckpt, "--data", verdict, "--max-steps", "2", "--learning-rate", "1e-5",
            "--out", tmp_path / "run", "--device", "cpu", "--set", "train.eval_freq=100", "--set", "train.max_new_tokens=0")
    assert r.exit_code == 0, r.stderr
    before, after = load_checkpoint(ckpt).weights, load_checkpoint(tmp_path / "run").weights
    assert set(before) == set(after)
    drift = max((after[k] - before[k]).abs().max().item() for k in before)
    # 2 AdamW steps move a weight by at most ~lr (1e-5) each; a fresh init would differ by O(0.1)
    assert 0 < drift < 1e-3  # two small AdamW steps away from the imported weights, not a fresh init


def test_a_hf_config_our_model_rejects_is_reported_against_the_file():
    """ConfigError is a ValueError, so config_from_hf's handler names the file it came from."""
    from gptcli.config import ConfigError
    from gptcli.errors import InputError
    from gptcli.convert import config_from_hf

    bad = {"model_type": "gpt2", "n_embd": 64, "n_head": 4, "n_layer": 0, "n_positions": 32, "vocab_size": 100}
    with pytest.raises(InputError) as e:
        config_from_hf(bad, "hub/config.json")
    assert str(e.value).startswith("hub/config.json: model.n_layers")
    assert issubclass(ConfigError, ValueError)


# ---------------------------------------------------------------- --overwrite replaces only gptcli's own output


@pytest.fixture
def small_run(tiny_config, tmp_path):
    """A run folder with two step checkpoints (random weights) and a metrics file."""
    from test_evaluate import save_model_checkpoint

    run = tmp_path / "run"
    save_model_checkpoint(run, tiny_config, 5, seed=1)
    save_model_checkpoint(run, tiny_config, 10, seed=2)
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    return run


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_export_json_names_the_folder_written_and_the_step_it_exported(cli, small_run, tmp_path):
    r = cli("export", small_run, tmp_path / "hf", "--json")  # a run: its newest step that verifies
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout) == {"out": str(tmp_path / "hf"), "checkpoint": str(small_run / "step-000010"),
                                    "format": "hf"}
    assert (tmp_path / "hf" / "config.json").is_file()


def test_export_overwrite_never_deletes_what_gptcli_did_not_write(cli, small_run, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    victim = tmp_path / "victim"
    import shutil

    shutil.copytree(small_run, victim)
    afile = tmp_path / "afile"
    afile.write_text("hi")
    for target, found in ((mine, "notes.txt"), (victim, "step-000005"), (small_run, "metrics.jsonl"),
                          (afile, "not a directory")):
        before = _tree(target) if target.is_dir() else target.read_bytes()
        r = cli("export", small_run / "step-000005", target, "--overwrite")
        assert r.exit_code == 2, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and found in r.stderr, r.stderr
        assert (_tree(target) if target.is_dir() else target.read_bytes()) == before
    # an earlier export is gptcli's own: --overwrite replaces it; an empty folder is taken as it is
    out = tmp_path / "hf"
    out.mkdir()
    assert cli("export", small_run / "step-000005", out).exit_code == 0
    r = cli("export", small_run / "step-000010", out)
    assert r.exit_code == 2 and "--overwrite" in r.stderr
    r = cli("export", small_run / "step-000010", out, "--overwrite")
    assert r.exit_code == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["config.json", "model.safetensors", "vocab.json", "merges.txt", "tokenizer_config.json",
         "special_tokens_map.json"])
    # an export someone added a file to is no longer only ours
    (out / "README.md").write_text("model card")
    r = cli("export", small_run / "step-000005", out, "--overwrite")
    assert r.exit_code == 2 and "README.md" in r.stderr and (out / "README.md").is_file()


def test_import_overwrite_never_deletes_what_gptcli_did_not_write(cli, small_run, tmp_path):
    assert cli("export", small_run / "step-000005", tmp_path / "hf").exit_code == 0
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    afile = tmp_path / "afile"
    afile.write_text("hi")
    for target, found in ((mine, "notes.txt"), (small_run, "step-000005"), (small_run / "step-000010", "step-000010"),
                          (afile, "not a directory")):
        before = _tree(target) if target.is_dir() else target.read_bytes()
        for extra in ((), ("--overwrite",)):
            r = cli("import", tmp_path / "hf", "--out", target, *extra)
            assert r.exit_code == 2, r.stderr
            assert len(r.stderr.strip().splitlines()) == 1 and found in r.stderr, r.stderr
            assert (_tree(target) if target.is_dir() else target.read_bytes()) == before
    out = tmp_path / "imp"
    assert cli("import", tmp_path / "hf", "--out", out).exit_code == 0
    r = cli("import", tmp_path / "hf", "--out", out)
    assert r.exit_code == 2 and "--overwrite" in r.stderr
    assert cli("import", tmp_path / "hf", "--out", out, "--overwrite").exit_code == 0
    load_checkpoint(out)


@pytest.fixture
def disk_full(monkeypatch):
    """Every safetensors write fails part-way as on a full disk (safetensors raises its own error type)."""
    from safetensors import SafetensorError

    from gptcli import checkpoint

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 1000)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(checkpoint, "save_file", full)


def test_import_overwrite_on_a_full_disk_keeps_the_earlier_import(cli, small_run, tmp_path, request):
    """The earlier import's files were deleted before the new one was written: a full disk lost both."""
    assert cli("export", small_run / "step-000005", tmp_path / "hf").exit_code == 0
    out = tmp_path / "imp"
    assert cli("import", tmp_path / "hf", "--out", out).exit_code == 0
    before = _tree(out)
    request.getfixturevalue("disk_full")
    r = cli("import", tmp_path / "hf", "--out", out, "--overwrite")
    assert r.exit_code == 1 and "No space left on device" in r.stderr, r.stderr
    assert _tree(out) == before and not [p for p in out.iterdir() if p.name.startswith(".tmp-")]
    load_checkpoint(out)
    r = cli("import", tmp_path / "hf", "--out", tmp_path / "new" / "imp")  # a new folder: not left behind empty
    assert r.exit_code == 1 and not (tmp_path / "new").exists(), r.stderr


def test_export_on_a_full_disk_is_one_line_and_leaves_no_temporary(cli, small_run, tmp_path, request):
    """safetensors' own error escaped as 'internal error: SafetensorError' and .tmp-export-NAME/ stayed."""
    out = tmp_path / "hf"
    assert cli("export", small_run / "step-000005", out).exit_code == 0
    before = _tree(out)
    request.getfixturevalue("disk_full")
    r = cli("export", small_run / "step-000010", out, "--overwrite")
    assert r.exit_code == 1, r.stderr
    assert r.stderr.startswith("error: ") and "No space left on device" in r.stderr, r.stderr
    assert _tree(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["hf", "run"]


def test_a_padded_hf_vocabulary_imports_as_gpt2s_and_generate_never_draws_a_padding_row(cli, tmp_path):
    """nanoGPT and llm.c pad GPT-2's 50257 rows to 50304; a padding row favoured by the head crashed generate."""
    hf = random_hf_model(**{**SHAPES["ctx48-untied"], "vocab_size": 50304})
    with torch.no_grad():
        hf.lm_head.weight[50300] = 1000.0 * hf.transformer.ln_f.bias.sign()  # the padding row wins every argmax
    hf.save_pretrained(tmp_path / "hf")
    r = cli("import", tmp_path / "hf", "--out", tmp_path / "ckpt")
    assert r.exit_code == 0, r.stderr
    model = our_model(tmp_path / "ckpt")
    assert (model.cfg.vocab_size, model.cfg.padded_vocab_size) == (50257, 50304)
    x = tokens(16)
    with torch.no_grad():
        # our layers vs transformers' GPT-2 on the same weights, over the rows a token has
        torch.testing.assert_close(model(x), hf(x).logits[..., :50257], atol=1e-4, rtol=0)
    r = cli("generate", PROMPT, "--checkpoint", tmp_path / "ckpt", "--max-new-tokens", "3", "--no-eos", "--json")
    assert r.exit_code == 0, r.stderr
    assert all(i < 50257 for i in json.loads(r.stdout)["samples"][0]["ids"])


def test_export_then_import_keeps_pad_vocab_multiple_and_init(cli, tiny_config, tmp_path):
    """The round trip gave back pad_vocab_multiple 1 and init book, so the imported model's config was not its own."""
    import dataclasses

    from test_evaluate import save_model_checkpoint

    cfg = dataclasses.replace(tiny_config, model=dataclasses.replace(tiny_config.model, pad_vocab_multiple=64, init="gpt2"))
    ckpt = save_model_checkpoint(tmp_path / "run", cfg, 2, seed=1)
    assert cli("export", ckpt, tmp_path / "hf").exit_code == 0
    assert cli("import", tmp_path / "hf", "--out", tmp_path / "back").exit_code == 0
    back = load_checkpoint(tmp_path / "back")
    assert back.config.model == cfg.model
    original = load_checkpoint(ckpt).weights
    assert all(torch.equal(back.weights[k], original[k]) for k in original)
