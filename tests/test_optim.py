"""train.optimizer muon: which parameters Muon gets, exact resume, settings refused where they do not apply."""

from __future__ import annotations

import pytest
import torch

from conftest import CONFIGS, final_weights, run_losses
from gptcli.checkpoint import load_checkpoint
from gptcli.config import ConfigError, load_config
from gptcli.model import GPTModel
from gptcli.optim import build_optimizer
from gptcli.train import train
from test_train import _StopAtStep

BLOCK_MATRICES = ("att.W_query.weight", "att.W_key.weight", "att.W_value.weight", "att.out_proj.weight",
                  "ff.layers.0.weight", "ff.layers.2.weight")


def _muon_config(verdict, **sets):
    values = {"data.path": str(verdict), "train.device": "cpu", "train.optimizer": "muon", "train.max_steps": 4,
              "train.eval_freq": 3, "train.max_new_tokens": 0, "train.peak_flops": 1e12, "train.save_freq": None}
    values.update(sets)
    return load_config(CONFIGS / "tiny.yaml", values)


def test_muon_gets_the_blocks_weight_matrices_and_adamw_the_rest(verdict):
    cfg = _muon_config(verdict, **{"model.qkv_bias": True, "train.decay_matrices_only": True})
    model = GPTModel(cfg.model)
    opt = build_optimizer(model, cfg.train)
    name = {id(p): n for n, p in model.named_parameters()}
    muon = {name[id(p)] for g in opt.muon.param_groups for p in g["params"]}
    adamw = {name[id(p)] for g in opt.adamw.param_groups for p in g["params"]}
    expected = {f"trf_blocks.{i}.{m}" for i in range(cfg.model.n_layers) for m in BLOCK_MATRICES}
    assert muon == expected
    assert adamw == set(name.values()) - expected
    assert {"tok_emb.weight", "pos_emb.weight", "out_head.weight", "final_norm.scale",
            "trf_blocks.0.att.W_query.bias", "trf_blocks.0.norm1.scale"} <= adamw
    assert isinstance(opt.muon, torch.optim.Muon) and isinstance(opt.adamw, torch.optim.AdamW)
    assert build_optimizer(model, load_config(None).train).__class__ is torch.optim.AdamW  # adamw: as before


def test_muon_follows_the_learning_rate_schedule(verdict):
    cfg = _muon_config(verdict, **{"train.muon": {"lr": 0.02}, "train.learning_rate": 0.001})
    model = GPTModel(cfg.model)
    opt = build_optimizer(model, cfg.train)
    for group in opt.param_groups:  # what the loop's schedule does at half the peak rate
        group["lr"] = 0.0005
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert opt.muon.param_groups[0]["lr"] == pytest.approx(0.01)  # 0.02 x 0.5 (float64 arithmetic)
    assert opt.adamw.param_groups[0]["lr"] == 0.0005


def test_muon_stops_and_resumes_bit_for_bit(verdict, tmp_path):
    cfg = _muon_config(verdict)
    train(cfg, tmp_path / "full")
    with pytest.raises(Exception) as stopped:
        train(cfg, tmp_path / "stopped", events=_StopAtStep(2))
    assert type(stopped.value).__name__ == "Interrupted"
    state = load_checkpoint(tmp_path / "stopped" / "step-000002", with_train_state=True).train_state
    assert state["muon"]["state"] and state["optimizer"]["state"]  # both optimizers' states are saved
    train(cfg, tmp_path / "stopped", resume=True)
    assert run_losses(tmp_path / "stopped") == run_losses(tmp_path / "full")
    ours, theirs = final_weights(tmp_path / "stopped"), final_weights(tmp_path / "full")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    plain = tmp_path / "adamw"
    train(_muon_config(verdict, **{"train.optimizer": "adamw"}), plain)
    assert run_losses(plain) != run_losses(tmp_path / "full")  # Muon did step the matrices


@pytest.mark.parametrize("sets, key", [
    ({"train.muon": {"lr": 0.02}}, "train.muon: applies only with train.optimizer muon"),
    ({"train.optimizer": "muon", "train.muon": {"beta": 0.9}}, "train.muon.beta: unknown key"),
    ({"train.optimizer": "muon", "train.muon": {"ns_steps": 0}}, "train.muon.ns_steps: must be positive"),
    ({"train.optimizer": "muon", "train.muon": {"nesterov": "yes"}}, "train.muon.nesterov: expected true or false"),
    ({"train.optimizer": "muon", "train.muon": {"adjust_lr_fn": "x"}}, "train.muon.adjust_lr_fn: must be"),
    ({"train.optimizer": "muon", "train.muon": {"momentum": 5}}, "train.muon.momentum: must be in [0, 1), got 5"),
    ({"train.optimizer": "muon", "train.muon": {"momentum": -0.1}}, "train.muon.momentum: must be in [0, 1)"),
])
def test_muon_settings_are_refused_by_name_where_they_do_not_apply(sets, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, sets)
    assert key in str(e.value)


def test_cli_refuses_muon_settings_with_adamw(cli, verdict, tmp_path):
    r = cli("train", "--config", CONFIGS / "tiny.yaml", "--data", verdict, "--out", tmp_path / "run",
            "--set", "train.muon={lr: 0.02}")
    assert r.exit_code == 2 and "train.muon" in r.stderr and not (tmp_path / "run").exists()
