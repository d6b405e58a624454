"""Issue 13, the thin CLI: library errors name parameters and config keys while the CLI names its
flags; --version and -h; one spelling per concept (deprecated spellings warn and keep working);
one progress renderer whose plain lines carry the elapsed time and the ETA."""

import json

import pytest
import torch

from conftest import CONFIGS
from gptcli.config import ConfigError, config_from_dict, load_config
from gptcli.errors import InputError
from test_evaluate import save_model_checkpoint

TINY = str(CONFIGS / "tiny.yaml")


@pytest.fixture
def ckpt(tiny_config, tmp_path):
    return save_model_checkpoint(tmp_path / "checkpoints" / "tiny", tiny_config, 10, seed=3)


def _library_error(call) -> InputError:
    with pytest.raises(InputError) as e:
        call()
    assert "--" not in str(e.value), f"a notebook caller is told about a flag: {e.value}"
    return e.value


# ---------------------------------------------------------------- errors: parameters in the library, flags in the CLI


def test_sampling_errors_name_the_parameter_in_a_notebook_and_the_flag_in_the_cli(cli, ckpt):
    from gptcli.generate import check_sampling

    e = _library_error(lambda: check_sampling(10, 0.0, 0, None))
    assert e.param == "top_k" and str(e).startswith("top_k: must be >= 1")
    e = _library_error(lambda: check_sampling(10, 0.0, 5, None, vocab_size=50257))
    assert "temperature=0" in str(e) and "top_k=5" in str(e)
    r = cli("generate", "hi", "--checkpoint", ckpt, "--top-k", "5", "--max-new-tokens", "1")
    assert r.exit_code == 2 and r.stderr.startswith("error: --top-k: has no effect with --temperature 0"), r.stderr
    assert "drop --top-k 5" in r.stderr and "top_k" not in r.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_device_error_names_the_config_key_in_a_notebook_and_flag_and_key_in_the_cli(cli, ckpt):
    from gptcli.device import resolve_device

    e = _library_error(lambda: resolve_device("cuda"))
    assert e.param == "train.device" and str(e).startswith("train.device 'cuda'")
    r = cli("generate", "hi", "--checkpoint", ckpt, "--device", "cuda", "--max-new-tokens", "1")
    assert r.exit_code == 2 and "error: --device (train.device) 'cuda': CUDA is not available" in r.stderr


def test_contradicting_train_flags_are_named_as_keywords_in_a_notebook_and_as_flags_in_the_cli(cli, tmp_path):
    from gptcli.resolve import resolve_train

    e = _library_error(lambda: resolve_train(None, None, {}, out=tmp_path / "r", resume=True, overwrite=True))
    assert str(e).startswith("resume=True and overwrite=True: give one of them")
    r = cli("train", "--config", TINY, "--out", tmp_path / "r", "--resume", "--overwrite")
    assert r.exit_code == 2 and r.stderr.startswith("error: --resume and --overwrite: give one of them"), r.stderr


def test_prepare_val_ratio_has_one_range_the_librarys(cli, verdict, tmp_path):
    from gptcli.shards import prepare

    e = _library_error(lambda: prepare([verdict], tmp_path / "lib", val_ratio=1.0))
    assert e.param == "val_ratio"
    r = cli("prepare", verdict, "--out", tmp_path / "p1", "--val-ratio", "1.0")
    assert r.exit_code == 2 and "--val-ratio: must be in [0, 1), got 1.0" in r.stderr, r.stderr
    # The CLI refused anything above 0.5 while the library took [0, 1): now both take 0.7.
    r = cli("prepare", verdict, "--out", tmp_path / "p2", "--val-ratio", "0.7", "--split-docs", "blank-lines")
    assert r.exit_code == 0, r.stderr


# ---------------------------------------------------------------- --version, -h


def test_version_and_h_on_the_app_and_on_every_command(cli):
    from importlib.metadata import version

    r = cli("--version")
    assert r.exit_code == 0 and r.stdout.strip() == f"gptcli {version('gptcli')}"
    assert cli("-h").stdout == cli("--help").stdout
    for command in ("train", "eval", "generate", "loss", "plot", "download", "import", "export", "prepare"):
        r = cli(command, "-h")
        assert r.exit_code == 0 and "Usage:" in r.stdout and "-h, --help" in r.stdout, command


# ---------------------------------------------------------------- one spelling per concept


def test_deprecated_config_keys_load_under_their_new_names_with_a_warning(tmp_path):
    cfg = load_config(sets=["train.save_every=7", "train.log_every=2", "train.sample_tokens=3"])
    assert (cfg.train.save_freq, cfg.train.log_freq, cfg.train.max_new_tokens) == (7, 2, 3)
    assert cfg.warnings == ["--set: train.sample_tokens is deprecated; use train.max_new_tokens",
                            "--set: train.log_every is deprecated; use train.log_freq",
                            "--set: train.save_every is deprecated; use train.save_freq"]
    old = tmp_path / "old.yaml"
    old.write_text("train:\n  save_every: 9\n", encoding="utf-8")
    assert load_config(old).train.save_freq == 9
    # A checkpoint's config.yaml written before the rename resumes and evaluates as it did.
    assert config_from_dict({"train": {"sample_tokens": 0}}, "ckpt/config.yaml").train.max_new_tokens == 0
    with pytest.raises(ConfigError, match="train.save_every and train.save_freq"):
        load_config(sets=["train.save_every=7", "train.save_freq=8"])
    assert load_config(CONFIGS / "tiny.yaml").warnings == []  # the shipped configs use the new names


def test_deprecated_spellings_on_the_command_line_warn_and_work(cli, ckpt, verdict):
    r = cli("loss", "--checkpoint", ckpt, "--data", verdict, "--num-batches", "1", "--json")
    assert r.exit_code == 0, r.stderr
    assert "warning: --num-batches is deprecated; use --eval-iter" in r.stderr
    new = cli("loss", "--checkpoint", ckpt, "--data", verdict, "--eval-iter", "1", "--json")
    assert new.stdout == r.stdout and "deprecated" not in new.stderr
    r = cli("generate", "hi", "--checkpoint", ckpt, "--max-new-tokens", "1", "--set", "train.sample_tokens=3")
    assert r.exit_code == 0 and "warning: --set: train.sample_tokens is deprecated; use train.max_new_tokens" in r.stderr
    r = cli("eval", ckpt, "--no-val", "--data", verdict, "--eval-iter", "1", "--json")
    assert r.exit_code == 0 and "the CHECKPOINT argument of eval is deprecated; use --checkpoint" in r.stderr
    assert r.stdout == cli("eval", "--checkpoint", ckpt, "--no-val", "--data", verdict, "--eval-iter", "1", "--json").stdout


# ---------------------------------------------------------------- progress


class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


INFO = {"total_steps": 10, "step": 0, "resumed": False, "params": 1e6, "device": "cpu", "world_size": 1,
        "train_tokens": 1000, "val_tokens": 100, "run_dir": "run"}
RECORD = {"event": "train", "epoch": 1, "loss": 5.0, "lr": 4e-4, "tokens_per_s": 1000.0}


def test_plain_train_progress_lines_carry_elapsed_time_and_eta(capsys):
    from gptcli.progress import Renderer, TrainProgress

    clock = _Clock()
    events = TrainProgress(renderer=Renderer(tty=False), clock=clock)
    events.start(INFO)
    clock.now += 20.0
    events.log({**RECORD, "step": 2})  # 2 of 10 steps in 20 s: 8 more take 80 s
    clock.now += 10.0
    events.log({**RECORD, "step": 3, "eta_s": 125.0, "peak_host_mb": 512.0})  # the loop's own ETA wins
    lines = capsys.readouterr().err.splitlines()
    assert lines[-2].startswith("step 2/10 · ") and lines[-2].endswith("elapsed 20s · ETA 1m20s")
    assert lines[-1].endswith("host 512 MB · elapsed 30s · ETA 2m05s")


def test_other_ranks_render_nothing(capsys):
    from gptcli.progress import TrainProgress

    events = TrainProgress(["a note"], quiet=True)
    events.start(INFO)
    events.log({**RECORD, "step": 1})
    events.warn("something")
    events.download(10, 100)
    assert capsys.readouterr().err == ""


def test_plain_download_and_prepare_progress(capsys):
    from gptcli.progress import PrepareProgress, Renderer, download_progress

    report = download_progress(Renderer(tty=False))
    for done in (0, 50, 100):
        report("model.safetensors", done, 100)
    assert capsys.readouterr().err == "downloading model.safetensors (100 bytes)\n"  # one line per file
    clock = _Clock()
    prepare = PrepareProgress(Renderer(tty=False), clock=clock)
    prepare(1_000_000, 4_000_000, 250_000)  # too soon for a line
    clock.now += 10.0
    prepare(2_000_000, 4_000_000, 500_000)
    prepare(4_000_000, 4_000_000, 1_000_000)  # the end: the command's summary reports it
    assert capsys.readouterr().err == "prepare  50.0% · 2.0/4.0 MB · 0.2 MB/s · 50,000 tokens/s\n"


# ---------------------------------------------------------------- one library call per command


def test_loss_reports_what_the_library_computes_for_a_notebook(cli, ckpt, verdict):
    from gptcli.checkpoint import load_checkpoint
    from gptcli.data import load_splits
    from gptcli.evaluate import model_from_checkpoint, split_losses

    loaded = load_checkpoint(ckpt)
    splits = load_splits(loaded.config.data, loaded.config.model.context_length)
    rows = split_losses(model_from_checkpoint(loaded), splits, 2, 3)
    r = cli("loss", "--checkpoint", ckpt, "--eval-iter", "3", "--batch-size", "2", "--json")
    assert r.exit_code == 0, r.stderr
    report = json.loads(r.stdout)
    assert {s: report[s] for s in ("train", "val")} == rows
    assert rows["train"]["batches"] == rows["val"]["batches"] == 3


def test_generate_warnings_name_parameters_in_a_notebook_and_flags_in_the_cli(cli, ckpt):
    from gptcli.checkpoint import load_checkpoint
    from gptcli.evaluate import model_from_checkpoint
    from gptcli.generate import complete

    said = []
    samples = complete(model_from_checkpoint(load_checkpoint(ckpt)), ["one two " * 40], 2, num_samples=2,
                       warn=said.append)
    assert len(samples) == 2 and samples[0]["text"] == samples[1]["text"]  # greedy: the same twice
    assert said[0].startswith("num_samples=2 with greedy decoding (temperature=0)") and "dropped" in said[1]
    assert not any("--" in s for s in said)
    r = cli("generate", "hi", "--checkpoint", ckpt, "--num-samples", "2", "--max-new-tokens", "1")
    assert r.exit_code == 0 and "warning: --num-samples 2 with greedy decoding (--temperature 0)" in r.stderr
