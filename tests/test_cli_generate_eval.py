"""`gptcli generate` and `gptcli eval`: what they print, on which stream, with which exit code."""

import json
import math
import os
import subprocess
import threading

import pytest
import torch

from conftest import CONFIGS, gptcli_cmd
from gptcli.checkpoint import load_checkpoint, model_from_checkpoint
from gptcli.generate import generate
from gptcli.tokenizer import decode, encode
from test_evaluate import save_model_checkpoint
from test_generate import one_thread  # noqa: F401 (an autouse fixture)

TINY = str(CONFIGS / "tiny.yaml")


@pytest.fixture
def ckpt(tiny_config, tmp_path):
    """A tiny step checkpoint (random weights) in ./checkpoints/tiny/."""
    return save_model_checkpoint(tmp_path / "checkpoints" / "tiny", tiny_config, 10, seed=3)


def test_untrained_generate_prints_the_books_text(cli):
    # The book's chapter-4/5 output of the untrained 124M model at seed 123.
    r = cli("generate", "Every effort moves you", "--max-new-tokens", "10", "--seed", "123")
    assert r.exit_code == 0, r.stderr
    assert r.stdout == "Every effort moves you rentingetic wasnم refres RexMeCHicular stren\n"
    assert "untrained" in r.stderr


@pytest.mark.parametrize("args, message", [
    ([""], "prompt: empty"),
    ([], "prompt: empty"),
    (["x", "--temperature", "-1"], "--temperature"),
    (["x", "--top-k", "0"], "--top-k"),
    (["x", "--top-k", "50258"], "--top-k: must be at most the vocabulary size 50257"),
    (["x", "--top-p", "0"], "--top-p"),
    (["x", "--top-p", "1.5"], "--top-p"),
    (["x", "--max-new-tokens", "-1"], "--max-new-tokens"),
    (["--prompts-file", "missing.txt"], "--prompts-file missing.txt: cannot read (No such file or directory)"),
    (["--prompts-file", "."], "--prompts-file .: cannot read (Is a directory)"),
    (["--prompts-file", "latin1.txt"], "--prompts-file latin1.txt: cannot read (not UTF-8 text)"),
    (["--prompts-file", "blank.txt"], "--prompts-file blank.txt: no prompts"),
    (["x", "--no-cache", "--compile-decode"], "--compile-decode: compiles the KV-cache step"),
    (["x", "--set", "data.path=elsewhere.txt"], "--set data.path: generate does not read it"),
    (["x", "--set", "train.batch_size=8"], "--set train.batch_size: generate does not read it"),
    (["x", "--set", "train.compile=true"], "--set train.compile: generate does not read it"),
])
def test_bad_generate_input_is_one_line_and_exit_2(cli, ckpt, tmp_path, args, message):
    (tmp_path / "latin1.txt").write_bytes("café\n".encode("latin-1"))
    (tmp_path / "blank.txt").write_text("\n  \n", encoding="utf-8")
    r = cli("generate", *args, "--checkpoint", ckpt)
    assert r.exit_code == 2
    assert r.stdout == ""
    assert len(r.stderr.splitlines()) == 1 and message in r.stderr


def test_missing_or_corrupt_checkpoint_is_exit_1_with_path_and_reason(cli, ckpt, tmp_path):
    for command in (["generate", "x", "--checkpoint"], ["eval", "--checkpoint"]):
        r = cli(*command, tmp_path / "nowhere")
        assert r.exit_code == 1
        assert r.stderr.strip() == f"error: {tmp_path / 'nowhere'}: no such checkpoint or run directory"
    weights = ckpt / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, different bytes
    weights.write_bytes(bytes(data))
    for command in (["generate", "x", "--checkpoint"], ["eval", "--checkpoint"]):
        r = cli(*command, ckpt)
        assert r.exit_code == 1 and r.stdout == ""
        assert len(r.stderr.splitlines()) == 1
        assert str(weights) in r.stderr and "sha256 does not match" in r.stderr


def test_prompts_file_and_samples_in_order_as_json_seeded(cli, ckpt, tmp_path):
    prompts = ["Every effort moves you", "I HAD always thought", "The height of his glory"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n\n", encoding="utf-8")
    args = ["generate", "--prompts-file", "prompts.txt", "--num-samples", "2", "--temperature", "1.0",
            "--top-k", "40", "--max-new-tokens", "12", "--checkpoint", ckpt, "--json"]
    r = cli(*args, "--seed", "7")
    assert r.exit_code == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["seed"] == 7
    samples = out["samples"]
    assert [(s["prompt"], s["sample"]) for s in samples] == [(p, k) for p in prompts for k in range(2)]
    for s in samples:
        assert s["text"] == s["prompt"] + s["completion"] and decode(s["ids"]) == s["completion"]
        assert (s["finish"] == "length") == (s["new_tokens"] == 12)
    # The same draws as the library with the same seed, and reproducible run to run.
    model = model_from_checkpoint(load_checkpoint(ckpt), "cpu")
    torch.manual_seed(7)
    expected = generate(model, [encode(p) for p in prompts for _ in range(2)], 12, temperature=1.0, top_k=40,
                        eos_id=50256)
    assert [s["ids"] for s in samples] == expected
    assert cli(*args, "--seed", "7").stdout == r.stdout
    assert cli(*args, "--seed", "8").stdout != r.stdout
    assert samples[0]["ids"] != samples[1]["ids"]  # two samples of one prompt differ


def test_stream_prints_what_the_plain_output_prints(cli, ckpt):
    plain = cli("generate", "Every effort moves you", "--checkpoint", ckpt, "--max-new-tokens", "40")
    streamed = cli("generate", "Every effort moves you", "--checkpoint", ckpt, "--max-new-tokens", "40", "--stream")
    assert plain.exit_code == streamed.exit_code == 0
    assert streamed.stdout == plain.stdout and plain.stdout.startswith("Every effort moves you")
    assert len(encode(plain.stdout)) > 30
    no_cache = cli("generate", "Every effort moves you", "--checkpoint", ckpt, "--max-new-tokens", "40", "--no-cache")
    assert no_cache.stdout == plain.stdout


def test_stream_flushes_each_token_to_a_pipe(ckpt, subprocess_env):
    # A pipe is block-buffered: without a flush per token the first read would get a full block.
    env = {k: v for k, v in subprocess_env.items() if k != "PYTHONUNBUFFERED"}
    proc = subprocess.Popen([*gptcli_cmd(), "generate", "Every effort moves you", "--checkpoint", str(ckpt),
                             "--stream", "--no-eos", "--max-new-tokens", "100000"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    watchdog = threading.Timer(120, proc.kill)
    watchdog.start()
    try:
        received = b""
        while len(received) <= len(b"Every effort moves you") + 10:
            chunk = os.read(proc.stdout.fileno(), 65536)
            assert chunk, "gptcli ended before streaming"
            assert len(chunk) < 4096
            received += chunk
        assert proc.poll() is None  # still generating: the text arrived as it was produced
        assert received.startswith(b"Every effort moves you")
    finally:
        watchdog.cancel()
        proc.kill()
        proc.wait()


def test_eval_perplexity_is_exp_of_the_loss_that_gptcli_loss_reports(cli, ckpt):
    loss = cli("loss", "--checkpoint", ckpt, "--json")
    ev = cli("eval", "--checkpoint", ckpt, "--json")
    assert loss.exit_code == ev.exit_code == 0, ev.stderr
    val = json.loads(loss.stdout)["val"]
    (row,) = json.loads(ev.stdout)["results"]
    assert row["dataset"] == "val (the-verdict.txt)"
    assert row["loss"] == val["loss"] and row["tokens"] == val["tokens"]
    # the same float64 exp of the same loss; 1e-12 only allows for a JSON round trip of the digits
    assert row["ppl"] == pytest.approx(math.exp(val["loss"]), rel=1e-12)
    assert 0 < row["bpb"] < row["loss"] / math.log(2)  # a GPT-2 token is more than one byte


def test_eval_files_table_and_usage_errors(cli, ckpt, tmp_path, verdict):
    (tmp_path / "notes.txt").write_text("It had always been his fate to have women say such things. " * 20)
    r = cli("eval", "--checkpoint", ckpt, "--data", "notes.txt", "--data", verdict)
    assert r.exit_code == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["dataset", "loss", "perplexity", "bits/byte", "tokens"]
    assert [line.split()[0] for line in lines[1:]] == ["val", "notes.txt", str(verdict)]
    r = cli("eval", "--checkpoint", ckpt, "--data", "notes.txt", "--no-val", "--json")
    assert [row["dataset"] for row in json.loads(r.stdout)["results"]] == ["notes.txt"]
    for args, message in ((["--no-val"], "--no-val"), (["--show-tokens"], "--show-tokens: needs --text"),
                          (["--text", "a b c", "--all"], "--text: cannot be combined"),
                          (["--data", "missing.txt"], "missing.txt: data file not found (from --data)")):
        r = cli("eval", "--checkpoint", ckpt, *args)
        assert r.exit_code == 2 and len(r.stderr.splitlines()) == 1 and message in r.stderr, r.stderr


def test_a_folders_files_left_out_for_their_suffix_are_said_by_eval_loss_and_train(cli, ckpt, tmp_path, verdict):
    """prepare says which files of a folder its reader leaves out; train, loss and eval --data read with it, silently."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "book.txt").write_text(verdict.read_text(encoding="utf-8"), encoding="utf-8")
    (folder / "notes.md").write_text("# not read\n")
    (folder / "UP.TXT").write_text("not read either\n")
    runs = [("eval", "--checkpoint", ckpt, "--data", folder, "--no-val", "--eval-iter", "1"),
            ("eval", "--checkpoint", ckpt, "--all", "--data", folder, "--no-val", "--eval-iter", "1"),
            ("loss", "--checkpoint", ckpt, "--data", folder, "--eval-iter", "1"),
            ("train", "--config", TINY, "--data", folder, "--out", tmp_path / "run", "--max-steps", "1")]
    for args in runs:
        r = cli(*args)
        assert r.exit_code == 0, r.stderr
        assert f"warning: {folder}: skipped 2 file(s) whose names end in none of .txt" in r.stderr, (args, r.stderr)
        assert "suffixes are case-sensitive" in r.stderr
    r = cli("eval", "--checkpoint", ckpt, "--data", verdict, "--no-val", "--eval-iter", "1")
    assert "skipped" not in r.stderr  # a file named directly is read whatever its name


def test_eval_data_of_a_prepared_folder_without_validation_tokens_says_it_is_the_split(cli, ckpt, tmp_path, verdict):
    """It said "prep: 0 token(s); scoring needs at least 2", of a folder holding thousands of training tokens."""
    from gptcli.shards import prepare

    prepare([verdict], tmp_path / "prep", workers=1, val_ratio=0.0)
    r = cli("eval", "--checkpoint", ckpt, "--data", tmp_path / "prep", "--no-val")
    assert r.exit_code == 2 and r.stdout == "" and len(r.stderr.splitlines()) == 1
    assert "its validation split holds 0 token(s)" in r.stderr and "gptcli prepare --val-ratio" in r.stderr, r.stderr


def test_eval_show_tokens_table_and_json(cli, ckpt):
    r = cli("eval", "--checkpoint", ckpt, "--text", "Every effort moves you", "--show-tokens")
    assert r.exit_code == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:3] == ["pos", "token", "p(token)"]
    assert len(lines) == 6  # header, 4 tokens, summary: no wrapping into a pipe
    assert [line.split()[0] for line in lines[1:5]] == ["0", "1", "2", "3"]
    assert "'Every'" in lines[1] and "' effort'" in lines[2] and "' you'" in lines[4]
    assert lines[4].count(",") == 4  # five alternatives
    assert lines[-1].startswith("loss ") and "3 predicted tokens" in lines[-1]
    data = json.loads(cli("eval", "--checkpoint", ckpt, "--text", "Every effort moves you", "--json").stdout)
    assert [t["token"] for t in data["tokens"]] == ["Every", " effort", " moves", " you"]
    assert all(len(t["top"]) == 5 and 1 <= t["rank"] <= 50257 for t in data["tokens"][1:])
    # pytest's default rel=1e-6: the same exp, computed before and after JSON
    assert data["ppl"] == pytest.approx(math.exp(data["loss"]))


def test_eval_all_prints_loss_against_step_and_warns_about_damage(cli, tiny_config, tmp_path):
    run = tmp_path / "checkpoints" / "tiny"
    for step in (10, 20, 30):
        save_model_checkpoint(run, tiny_config, step, seed=step)
    (run / "step-000020" / "manifest.json").unlink()
    r = cli("eval", "--all", "--eval-iter", "1")  # the newest run under ./checkpoints
    assert r.exit_code == 0, r.stderr
    assert [line.split()[:2] for line in r.stdout.splitlines()[1:]] == [["10", "step-000010"], ["30", "step-000030"]]
    assert "warning: skipped a damaged checkpoint" in r.stderr and "step-000020" in r.stderr
    data = json.loads(cli("eval", "--checkpoint", run, "--all", "--eval-iter", "1", "--json").stdout)
    assert [row["step"] for row in data["results"]] == [10, 30] and len(data["skipped"]) == 1


@pytest.mark.parametrize("newest", ["removed", "damaged"])
def test_a_checkpoint_other_than_the_named_or_latest_one_is_said_in_one_line(cli, tiny_config, tmp_path, newest):
    """Audit f1 defect 4: `--checkpoint RUN` silently used step-10 when `latest` dangled or step-20 was damaged."""
    from gptcli.checkpoint import point

    run = tmp_path / "run"
    for step in (10, 20):
        save_model_checkpoint(run, tiny_config, step, seed=step)
    point(run, "latest", run / "step-000020")
    r = cli("generate", "Hi", "--checkpoint", run, "--max-new-tokens", "1")  # what latest names: nothing to say
    assert r.exit_code == 0 and "step-000010" not in r.stderr, r.stderr
    if newest == "removed":
        import shutil
        shutil.rmtree(run / "step-000020")
    else:
        (run / "step-000020" / "manifest.json").write_text("{garbage")
    for command in (["generate", "Hi", "--max-new-tokens", "1"], ["eval", "--eval-iter", "1"]):
        r = cli(*command, "--checkpoint", run)
        assert r.exit_code == 0, r.stderr
        said = [line for line in r.stderr.splitlines() if "step-000010" in line]
        assert len(said) == 1 and "step-000020" in said[0], r.stderr


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_generate_decode_precision_prints_what_the_low_precision_model_decodes(cli, ckpt, precision):
    from gptcli.generate import lower_precision_for_decoding

    model = model_from_checkpoint(load_checkpoint(ckpt), "cpu")
    low = lower_precision_for_decoding(model, precision)
    expected = "Hello" + decode(generate(low, [encode("Hello")], 8)[0])
    r = cli("generate", "Hello", "--checkpoint", ckpt, "--max-new-tokens", "8", "--decode-precision", precision)
    assert r.exit_code == 0, r.stderr
    assert r.stdout == expected + "\n"
    r = cli("generate", "Hello", "--checkpoint", ckpt, "--max-new-tokens", "8", "--decode-precision", "fp16")
    assert r.exit_code == 2 and "--decode-precision" in r.stderr


def test_generate_max_new_tokens_defaults_from_the_resolved_config(cli, ckpt):
    """--max-new-tokens: flag > --set > the checkpoint's config (tiny.yaml: 10); it was always 50."""
    def new_tokens(*args):
        r = cli("generate", "Hi", "--checkpoint", ckpt, "--no-eos", "--json", *args)
        assert r.exit_code == 0, r.stderr
        return json.loads(r.stdout)["samples"][0]["new_tokens"]

    assert new_tokens() == 10
    assert new_tokens("--set", "train.max_new_tokens=3") == 3
    assert new_tokens("--set", "train.max_new_tokens=3", "--max-new-tokens", "2") == 2


@pytest.mark.parametrize("command", ["loss", "eval"])
def test_eval_and_loss_refuse_a_set_of_train_eval_iter_naming_the_flag(cli, ckpt, command):
    """They read --eval-iter only (every batch by default, the book's calc_loss_loader); the key was dropped silently."""
    r = cli(command, "--checkpoint", ckpt, "--set", "train.eval_iter=1")
    assert r.exit_code == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "train.eval_iter" in r.stderr and "--eval-iter" in r.stderr


@pytest.mark.parametrize("args", [
    ["eval", "--eval-iter", "1"], ["eval", "--all", "--eval-iter", "1"], ["eval", "--text", "Every effort moves you"],
    ["loss", "--eval-iter", "1"], ["eval", "--task", "choices", "--task-data", "{ch}"],
])
def test_eval_and_loss_refuse_seed_beside_a_checkpoint_which_leaves_nothing_to_seed(cli, ckpt, tmp_path, args):
    """--seed seeds an untrained model's weights; with a checkpoint's weights eval and loss drew nothing: it was dropped."""
    ch = tmp_path / "ch.jsonl"
    ch.write_text('{"context": "The cat sat on the", "choices": ["mat", "moon"], "answer": 0}\n')
    r = cli(*[a.format(ch=ch) for a in args], "--checkpoint", ckpt, "--seed", "5")
    assert r.exit_code == 2 and r.stdout == ""
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("error: --seed: seeds the weights of an untrained model")
    fresh = tmp_path / "fresh.yaml"  # a config without a run: an untrained model, whose init the seed applies to
    fresh.write_text(open(TINY).read())
    r = cli("eval", "--config", fresh, "--text", "Every effort moves you", "--seed", "5")
    assert r.exit_code == 0 and "untrained" in r.stderr, r.stderr


@pytest.mark.parametrize("args, names", [
    (["eval", "--task", "choices", "--task-data", "{ch}", "--per-item"], ["--per-item", "--json"]),
    (["eval", "--task", "choices", "--task-data", "{ch}", "--show-tokens"], ["--show-tokens"]),
    (["eval", "--text", "Every effort moves you", "--eval-iter", "1"], ["--text", "--eval-iter"]),
    (["eval", "--text", "Every effort moves you", "--batch-size", "3"], ["--text", "--batch-size"]),
    (["eval", "--text", "Every effort moves you", "--no-val"], ["--text", "--no-val"]),
    (["generate", "Hi", "--stream", "--json"], ["--stream", "--json"]),
])
def test_flags_that_cannot_apply_are_refused_by_name(cli, ckpt, tmp_path, args, names):
    ch = tmp_path / "ch.jsonl"
    ch.write_text('{"context": "The cat sat on the", "choices": ["mat", "moon"], "answer": 0}\n')
    r = cli(*[a.format(ch=ch) for a in args], "--checkpoint", ckpt)
    assert r.exit_code == 2, r.stderr
    assert r.stdout == "" and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert all(n in r.stderr for n in names), r.stderr


def test_export_of_a_run_whose_newest_step_is_damaged_says_which_step_it_exports(cli, tiny_config, tmp_path):
    """Audit w2 #2: `export RUN` exported step-10 in silence when step-20 was damaged."""
    from safetensors.torch import load_file

    run = tmp_path / "run"
    for step in (10, 20):
        save_model_checkpoint(run, tiny_config, step, seed=step)
    with open(run / "step-000020" / "model.safetensors", "ab") as f:
        f.write(b"x")
    r = cli("export", run, tmp_path / "hf")
    assert r.exit_code == 0, r.stderr
    said = [line for line in r.stderr.splitlines() if "step-000010" in line]
    assert len(said) == 1 and "step-000020" in said[0] and said[0].startswith("warning"), r.stderr
    exported = load_file(str(tmp_path / "hf" / "model.safetensors"))
    step10 = load_file(str(run / "step-000010" / "model.safetensors"))
    assert torch.equal(exported["transformer.wte.weight"], step10["tok_emb.weight"])


def test_a_model_chosen_by_the_tool_never_skips_damage_in_silence_nor_falls_back_to_an_untrained_one(
        cli, tiny_config, tmp_path):
    """Audit w2 #3: with a config whose run held only a damaged checkpoint, generate said "no checkpoint
    in checkpoints/tiny" (false) and sampled an untrained model; a skipped newer one went unsaid."""
    run = tmp_path / "checkpoints" / "tiny"
    save_model_checkpoint(run, tiny_config, 10, seed=10)
    (run / "step-000010" / "manifest.json").write_text("{garbage")
    config = CONFIGS / "tiny.yaml"
    for how in (["--config", config], []):  # the config's run; the newest under checkpoints/
        r = cli("generate", "Hi", "--max-new-tokens", "1", *how)
        assert r.exit_code == 1 and "untrained" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "step-000010" in r.stderr and "verifies" in r.stderr
    save_model_checkpoint(run, tiny_config, 5, seed=5)
    later = (run / "step-000005" / "manifest.json").stat().st_mtime + 60
    os.utime(run / "step-000010" / "manifest.json", (later, later))  # the damaged one is the newest written
    for how in (["--config", config], []):
        r = cli("generate", "Hi", "--max-new-tokens", "1", *how)
        assert r.exit_code == 0, r.stderr
        said = [line for line in r.stderr.splitlines() if "step-000005" in line]
        assert len(said) == 1 and said[0].startswith("warning") and "step-000010" in said[0], r.stderr


def test_an_unknown_key_in_a_checkpoints_config_is_one_whole_line(cli, ckpt):
    """Audit w2 #14: the list of valid keys was cut at 200 characters, mid-word, parenthesis unclosed."""
    from gptcli.fsio import sha256_file

    config = ckpt / "config.yaml"
    config.write_text(config.read_text().replace("train:\n", "train:\n  bogus_key: 1\n", 1))
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"]["config.yaml"] = {"sha256": sha256_file(config), "bytes": config.stat().st_size}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    r = cli("generate", "hi", "--checkpoint", ckpt)
    assert r.exit_code == 1 and len(r.stderr.splitlines()) == 1, r.stderr
    line = r.stderr.strip()
    assert "train.bogus_key: unknown key" in line and line.endswith("))") and "weight_decay" in line


def test_a_prompt_that_is_not_utf8_is_refused_as_a_prompts_file_would_be(cli, ckpt):
    """Audit w2 #12: bytes that are not UTF-8 reach Python as lone surrogates (argv, a C-locale stdin);
    they were accepted, echoed raw and written to --json as lone surrogates."""
    r = cli("generate", "caf\udce9", "--checkpoint", ckpt, "--max-new-tokens", "1")
    assert r.exit_code == 2 and r.stdout == ""
    assert r.stderr.strip() == "error: prompt: not UTF-8 text (byte b'\\xe9' at character 3)"
    assert cli("generate", "café", "--checkpoint", ckpt, "--max-new-tokens", "1").exit_code == 0
