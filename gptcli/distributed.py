"""Multi-process training with torchrun: process group, DDP/FSDP wrapping, rank-0 I/O.

Launched as ``torchrun --nproc_per_node=N -m gptcli train ...``, every process
reads RANK/WORLD_SIZE/LOCAL_RANK from the environment. Gloo runs on CPU, NCCL on
CUDA. State is saved and restored as full (unsharded) state_dicts through
``torch.distributed.checkpoint.state_dict``, so a checkpoint written by N
processes resumes with M processes, or with one.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from gptcli.model import GPTModel


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: torch.device) -> DistInfo:
    """Join the torchrun process group if launched by torchrun with WORLD_SIZE > 1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return DistInfo(rank, world_size, local_rank)


def process_device(device: torch.device, info: DistInfo) -> torch.device:
    """Each process's own GPU (cuda:LOCAL_RANK) under torchrun; the device otherwise."""
    if info.enabled and device.type == "cuda":
        return torch.device("cuda", info.local_rank)
    return device


def wrap_model(model: GPTModel, kind: str, info: DistInfo, device: torch.device) -> torch.nn.Module:
    """Wrap for data parallelism: DDP (replicated weights) or FSDP2 (sharded weights)."""
    if not info.enabled:
        return model
    if kind == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.trf_blocks:
            fully_shard(block)
        return fully_shard(model)
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


@contextlib.contextmanager
def gradient_sync(module: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Forward and backward inside reduce gradients across processes only if `enabled`.

    Gradient accumulation needs the reduction on the last micro-batch only: DDP's ``no_sync()``
    and FSDP2's ``set_requires_gradient_sync(False)`` keep the others' gradients local (they
    accumulate in place), so a step costs one reduction, not one per micro-batch. A module that
    is not wrapped (one process) has nothing to sync.
    """
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(module, DistributedDataParallel):
        with contextlib.nullcontext() if enabled else module.no_sync():
            yield
    elif hasattr(module, "set_requires_gradient_sync"):  # FSDP2 (fully_shard)
        module.set_requires_gradient_sync(enabled)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
    else:
        yield


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum floats over all processes (identity outside a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    backend = dist.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    """Rank 0's `obj` on every process."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Unsharded model and optimizer state_dicts keyed by parameter names, on CPU.

    Wrapper prefixes (DDP's ``module.``, torch.compile's ``_orig_mod.``) are removed.
    Under FSDP every process must call this; the result is complete on rank 0.
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_state_dict(model, optimizer, options=options)


def load_full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, model_sd: dict, optim_sd: dict) -> None:
    """Load full state_dicts (as saved by `full_state`) into a possibly wrapped model."""
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd, options=options)


def launched_by_torchrun() -> bool:
    """Whether this process is one of torchrun's (it sets WORLD_SIZE, even to 1)."""
    return "WORLD_SIZE" in os.environ


def is_main_process() -> bool:
    """Rank 0 under torchrun, or a single process: the one that reports for all of them."""
    return os.environ.get("RANK", "0") == "0"


def relaunch_with_torchrun(nproc: int, args: list[str]) -> int:
    """Run `torchrun --standalone --nproc_per_node=N -m gptcli ARGS`; return its exit status.

    torchrun's own argument parser and launcher (``torch.distributed.run``) start the
    processes; a failing process's exit code (2 for bad input, 130/143 when interrupted)
    becomes the return value instead of torchrun's generic 1 and error report.

    Args:
        nproc: processes to start.
        args: gptcli's command line for each process (without the option that asked for nproc).

    Raises:
        RunError: a process was killed by a signal (it could not report itself); its
            ``exit_code`` is 128 + the signal number.
    """
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    from gptcli.errors import RunError

    # torchrun pins each process to 1 thread (and says so in a banner); share the CPUs instead.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # the processes report their own errors
    try:
        run(parse_args(["--standalone", f"--nproc_per_node={nproc}", "-m", "gptcli", *args]))
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        if failure.exitcode < 0:  # killed by a signal: it could not say so itself
            error = RunError(f"rank {rank} was killed by {failure.signal_name()}")
            error.exit_code = 128 - failure.exitcode
            raise error from None
        return failure.exitcode
    except SignalException as e:
        return 128 + int(e.sigval)
    return 0
