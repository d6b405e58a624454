"""The optimizer of a training run (``train.optimizer``): AdamW, or Muon with AdamW.

``adamw`` is the book's AdamW (PyTorch's kernels by ``train.optimizer_impl``). ``muon``
gives the 2-D weight matrices of the transformer blocks (attention projections and the
MLP) to ``torch.optim.Muon`` -- momentum orthogonalised by Newton-Schulz iterations --
and everything else (token and position embeddings, the output head, norms, biases) to
AdamW, as modded-nanogpt and torchtitan do: Muon is defined for hidden matrices, not for
embedding lookups or the classifier (Jordan et al. 2024, "Muon: An optimizer for hidden
layers in neural networks").

The learning-rate schedule drives both: it sets AdamW's rate, and Muon's follows in
proportion (``train.muon.lr`` x schedule / ``train.learning_rate``). With the default
``adjust_lr_fn: match_rms_adamw`` Muon's update has AdamW's RMS (Liu et al. 2025, "Muon is
scalable for LLM training"), so ``train.muon.lr`` defaults to ``train.learning_rate``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from gptcli.errors import InputError

# train.muon keys and their defaults (None: the AdamW value of the same name in train.*).
MUON_DEFAULTS: dict[str, Any] = {
    "lr": None,  # None = train.learning_rate
    "momentum": 0.95,
    "nesterov": True,
    "ns_steps": 5,
    "weight_decay": None,  # None = train.weight_decay
    "adjust_lr_fn": "match_rms_adamw",  # or "original" (Keller Jordan's sqrt(max(1, rows/cols)) scaling)
}


def is_muon_param(name: str, p: torch.Tensor) -> bool:
    """A 2-D weight matrix inside a transformer block (by its parameter name, wrappers' prefixes allowed)."""
    return p.dim() == 2 and "trf_blocks." in name and name.endswith(".weight")


def build_optimizer(model: torch.nn.Module, t) -> torch.optim.Optimizer | "MuonAdamW":
    """AdamW as the book builds it (optionally no decay on biases and norms, GPT-2 practice), or Muon + AdamW.

    Raises:
        InputError: train.optimizer muon on parameters Muon cannot take (FSDP-sharded matrices).
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    muon_params = [p for n, p in named if t.optimizer == "muon" and is_muon_param(n, p)]
    rest = [p for n, p in named if not (t.optimizer == "muon" and is_muon_param(n, p))]
    adamw = _adamw(rest, t)
    if t.optimizer != "muon":
        return adamw
    check_optimizer(t, fsdp=any(type(p).__name__ == "DTensor" for p in muon_params))
    m = {**MUON_DEFAULTS, **(t.muon or {})}
    lr = m["lr"] if m["lr"] is not None else t.learning_rate
    muon = torch.optim.Muon(
        muon_params, lr=lr, momentum=m["momentum"], nesterov=m["nesterov"], ns_steps=m["ns_steps"],
        weight_decay=m["weight_decay"] if m["weight_decay"] is not None else t.weight_decay,
        adjust_lr_fn=m["adjust_lr_fn"])
    return MuonAdamW(muon, adamw, lr / t.learning_rate)


def check_optimizer(t, fsdp: bool) -> None:
    """Refuse train.optimizer where it cannot run; called before the run directory is touched.

    Raises:
        InputError: train.optimizer muon with FSDP-sharded weights (Muon orthogonalises whole matrices).
    """
    if t.optimizer == "muon" and fsdp:
        raise InputError("train.optimizer muon: needs whole matrices; it does not run on FSDP-sharded weights "
                         "(train.distributed fsdp): use ddp")


def _adamw(params: list[torch.Tensor], t) -> torch.optim.AdamW:
    kwargs: dict[str, Any] = {"lr": t.learning_rate, "betas": (t.beta1, t.beta2), "weight_decay": t.weight_decay}
    if t.optimizer_impl == "foreach":
        kwargs["foreach"] = True
    elif t.optimizer_impl == "fused":
        kwargs["fused"] = True
    groups: Any = params
    if t.decay_matrices_only:
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": t.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
    return torch.optim.AdamW(groups, **kwargs)


class MuonAdamW:
    """Muon and AdamW stepped as one optimizer: ``param_groups`` (AdamW's), ``step``, ``zero_grad``.

    The loop's schedule writes AdamW's learning rate into ``param_groups``; ``step`` sets
    Muon's in proportion first. ``torch.amp.GradScaler`` unscales and steps it like any optimizer.
    """

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.AdamW, lr_ratio: float):
        self.muon, self.adamw, self.lr_ratio = muon, adamw, lr_ratio
        self.base_lr = adamw.param_groups[0]["lr"]

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """AdamW's groups then Muon's (the schedule's writes to Muon's are replaced at `step`)."""
        return self.adamw.param_groups + self.muon.param_groups

    def step(self) -> None:
        lr = self.adamw.param_groups[0]["lr"]
        for group in self.muon.param_groups:
            group["lr"] = lr * self.lr_ratio
        self.adamw.step()
        self.muon.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.adamw.zero_grad(set_to_none=set_to_none)
        self.muon.zero_grad(set_to_none=set_to_none)


def optimizer_parts(optimizer) -> tuple[torch.optim.Optimizer, dict[str, torch.optim.Optimizer]]:
    """The AdamW that train_state["optimizer"] holds, and the others by their train_state key ("muon")."""
    if isinstance(optimizer, MuonAdamW):
        return optimizer.adamw, {"muon": optimizer.muon}
    return optimizer, {}


def full_optimizer_states(model: torch.nn.Module, optimizer) -> dict[str, dict]:
    """train_state entries of the optimizers beyond AdamW (full state_dicts keyed by parameter names)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {key: get_optimizer_state_dict(model, opt, options=options) for key, opt in optimizer_parts(optimizer)[1].items()}


def load_optimizer_states(model: torch.nn.Module, optimizer, train_state: dict, where: str) -> None:
    """Restore the optimizers beyond AdamW from `train_state`.

    Raises:
        InputError: naming train.optimizer when the checkpoint was trained with another optimizer.
    """
    others = optimizer_parts(optimizer)[1]
    saved = {key for key in ("muon",) if key in train_state}
    if saved != set(others):
        had = "muon" if saved else "adamw"
        raise InputError(f"{where}: train.optimizer {'muon' if others else 'adamw'}: the run was trained with "
                         f"{had}; resume it with train.optimizer {had} (or start a new run with --init-from)")
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
    for key, opt in others.items():
        set_optimizer_state_dict(model, opt, train_state[key], options=options)


def in_backward_blocker(t, distributed: bool, precision: str, deferred: bool) -> str | None:
    """Why ``train.optimizer_in_backward`` cannot apply to this run (the config key that forbids it), or None.

    Each reason needs every gradient at once (the global norm, a sum over micro-batches or
    processes, the loss scaler's overflow check over all of them, a skip decided after backward).
    """
    if t.grad_clip is not None:
        return f"train.grad_clip {t.grad_clip} needs the global norm of all gradients before any step"
    if t.grad_accum_steps > 1:
        return f"train.grad_accum_steps {t.grad_accum_steps} sums gradients over micro-batches before the step"
    if distributed:
        return "a torchrun launch reduces gradients across processes before the step"
    if precision == "fp16":
        return "train.precision fp16: the gradient scaler checks all gradients for overflow before the step"
    if deferred:
        return "a deferred non-finite check decides after backward whether the step is skipped"
    return None


def step_in_backward(params, optimizer) -> None:
    """From now on, backward steps `optimizer` for each parameter as soon as its gradient is complete,
    then frees that gradient (hooks on `params`, living as long as they do).

    So the gradients of all parameters never exist at once: the step's peak memory loses up to
    one float32 copy of the model (650 MB for GPT-2 124M). The arithmetic is the optimizer's own:
    ``optimizer.step()`` updates only the parameters that hold a gradient, and at each hook only
    one does (the others were freed after their step, or are not computed yet), so every
    parameter gets the update a whole-model step gives it, bit for bit (PyTorch's tutorial
    "How to save memory by fusing the optimizer step into the backward pass" does the same with
    one optimizer per parameter; one optimizer keeps the checkpoint format unchanged).
    """

    def hook(p: torch.Tensor) -> None:
        optimizer.step()
        p.grad = None

    for p in params:
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(hook)
