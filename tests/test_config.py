"""Configs: every shipped file builds; bad values fail once, naming the file and the field."""

import textwrap

import pytest
import torch

from conftest import CONFIGS
from gptcli.config import Config, ConfigError, load_config
from gptcli.model import GPTModel

# Parameter counts with an untied output head (GPT-2's published sizes tie it to tok_emb).
GPT2_SIZES = {"gpt2-124m": 124_439_808, "gpt2-355m": 354_823_168, "gpt2-774m": 774_030_080, "gpt2-1558m": 1_557_611_200}


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_loads_and_builds(path):
    cfg = load_config(path)
    with torch.device("meta"):  # the real module tree, no memory for the 1558M weights
        model = GPTModel(cfg.model)
    n = model.num_params()
    assert n > 0
    if path.stem in GPT2_SIZES:
        tied = n - model.out_head.weight.numel()
        assert tied == GPT2_SIZES[path.stem]
        assert cfg.model.context_length == 1024 and cfg.model.qkv_bias and cfg.model.gelu == "tanh"


def test_reference_config_is_the_books():
    cfg = load_config(CONFIGS / "gpt2-124m-256.yaml")
    m = cfg.model
    assert (m.vocab_size, m.context_length, m.emb_dim, m.n_heads, m.n_layers, m.drop_rate, m.qkv_bias) == (
        50257, 256, 768, 12, 12, 0.1, False)
    t = cfg.train
    assert (t.learning_rate, t.weight_decay, t.num_epochs, t.batch_size, t.eval_freq, t.eval_iter, t.seed) == (
        0.0004, 0.1, 10, 2, 5, 5, 123)
    assert t.start_context == "Every effort moves you"
    assert cfg.data.train_ratio == 0.90
    # The defaults are the same run, so commands work without --config.
    assert load_config(None).model == cfg.model


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(textwrap.dedent(text))
    return p


@pytest.mark.parametrize(
    "yaml_text, field",
    [
        ("model:\n  emb_dimm: 10\n", "model.emb_dimm"),
        ("model:\n  n_layers: twelve\n", "model.n_layers"),
        ("model:\n  qkv_bias: 1\n", "model.qkv_bias"),
        ("model:\n  emb_dim: 100\n  n_heads: 12\n", "model.emb_dim"),
        ("model:\n  n_layers: 0\n", "model.n_layers"),
        ("model:\n  context_length: -5\n", "model.context_length"),
        ("model:\n  drop_rate: 1.0\n", "model.drop_rate"),
        ("model:\n  drop_rate: -0.1\n", "model.drop_rate"),
        ("model:\n  gelu: relu\n", "model.gelu"),
        ("train:\n  learning_rate: 0\n", "train.learning_rate"),
        ("train:\n  batch_size: 2.5\n", "train.batch_size"),
        ("data:\n  train_ratio: 1.5\n", "data.train_ratio"),
        ("optimizer:\n  lr: 1\n", "optimizer"),
        ("model: [1, 2]\n", "model"),
    ],
)
def test_bad_values_name_the_file_and_field(tmp_path, yaml_text, field):
    path = write(tmp_path, yaml_text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    message = str(e.value)
    assert str(path) in message and field in message
    assert "\n" not in message


def test_empty_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="empty"):
        load_config(write(tmp_path, ""))
    with pytest.raises(ConfigError, match="invalid YAML at line"):
        load_config(write(tmp_path, "model:\n  emb_dim: [1\n"))
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    "sets, field",
    [(["train.eval_freq=0", "train.eval_tasks_every=5"], "train.eval_freq"),
     (["train.eval_tasks=true"], "train.eval_tasks"), (["train.eval_tasks=5"], "train.eval_tasks"),
     (["train.learning_rate=1" + "0" * 400], "train.learning_rate"),
     (["train.num_threads=100000000000000000000"], "train.num_threads"), (["train.num_threads=5000"], "train.num_threads"),
     (["data.path=[{path: a, weight: 1" + "0" * 400 + "}]"], "data.path[0].weight")],
)
def test_odd_set_values_are_config_errors_naming_the_key_not_crashes(sets, field):
    with pytest.raises(ConfigError) as e:
        load_config(None, sets=sets)
    assert str(e.value).startswith("--set: ") and field in str(e.value)


@pytest.mark.parametrize("text", ["train:\n  [a]: 2\n", "? [a, b]\n: 1\n", "train:\n  ? {a: 1}\n  : 2\n"])
def test_a_list_or_mapping_as_a_yaml_key_is_invalid_yaml_naming_the_line(tmp_path, text):
    with pytest.raises(ConfigError, match="invalid YAML at line"):
        load_config(write(tmp_path, text))


def test_precedence_flag_over_set_over_yaml_over_default(tmp_path):
    path = write(tmp_path, "train:\n  batch_size: 4\n  max_steps: 7\n  learning_rate: 1e-3\n")
    cfg = load_config(path)
    assert (cfg.train.batch_size, cfg.train.max_steps, cfg.train.num_epochs) == (4, 7, 10)
    assert cfg.train.learning_rate == 0.001  # "1e-3" is a string to PyYAML; accepted as a number
    cfg = load_config(path, sets=["train.batch_size=8", "train.max_steps=9"])
    assert (cfg.train.batch_size, cfg.train.max_steps) == (8, 9)
    cfg = load_config(path, {"train.batch_size": 16, "train.max_steps": None}, sets=["train.batch_size=8"])
    assert (cfg.train.batch_size, cfg.train.max_steps) == (16, 7)  # None = flag not given


def test_set_parses_yaml_values_and_rejects_bad_keys(tmp_path):
    cfg = load_config(None, sets=["model.qkv_bias=true", "train.max_steps=null", "model.gelu=tanh"])
    assert cfg.model.qkv_bias is True and cfg.train.max_steps is None and cfg.model.gelu == "tanh"
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, sets=["no_equals_sign"])
    with pytest.raises(ConfigError, match="model.nope"):
        load_config(None, sets=["model.nope=1"])


def test_resolved_config_round_trips(tmp_path):
    from gptcli.config import save_config

    cfg = load_config(CONFIGS / "gpt2-355m.yaml", sets=["train.max_steps=5"])
    save_config(cfg, tmp_path / "out.yaml")
    again = load_config(tmp_path / "out.yaml")
    assert again.to_dict() == cfg.to_dict()
    assert isinstance(again, Config)


@pytest.mark.parametrize(
    "text, field",
    [("model:\n  emb_dim: 100\n", "model.emb_dim"), ("model:\n  typo: 1\n", "model.typo"),
     ("model:\n  drop_rate: 2\n", "model.drop_rate"), ("model:\n  n_heads: x\n", "model.n_heads")],
)
def test_cli_bad_config_exit_2_one_line(cli, tmp_path, text, field):
    path = write(tmp_path, text)
    for command in (["loss"], ["generate", "hi"], ["train"]):
        result = cli(*command, "--config", path)
        assert result.exit_code == 2, (command, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and field in lines[0] and str(path) in lines[0], result.stderr
        assert "Traceback" not in result.stderr
        assert result.stdout == ""
