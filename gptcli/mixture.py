"""Weighted mixtures of prepared corpora: ``data.path: [{path: A, weight: 0.7}, {path: B, weight: 0.3}]``.

Each source keeps its own windows (data.py cuts them as for one corpus). A
training batch draws, for each of its windows, a source with probability
proportional to its weight (a generator seeded from the epoch seed and the
batch number, so any batch can be drawn again without the ones before it), then
that source's next window: every source walks through its own permutation of
its windows and draws a fresh permutation when it runs out, so a small source
with a large weight repeats and a large one with a small weight is read only in
part. What a checkpoint needs to continue exactly is the position of every
source (windows drawn from it so far) and the seed of the permutations
(``state()`` / ``load_state()``); the epoch seed and the windows done in the
epoch are the ones train.py keeps for single corpora.

An epoch has as many windows as all sources together. Validation runs on each
source's own validation split; the overall validation loss is the mean of the
per-source losses weighted as the mixture.
"""

from __future__ import annotations

import bisect
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch.utils.data import Dataset

from gptcli.errors import InputError
from gptcli.sampling import GlobalBatchSampler
from gptcli.shards import INDEX, is_prepared, read_index

_GOLDEN = 0x9E3779B97F4A7C15  # golden-ratio stride between derived seeds (as data.WindowBatchSampler)


def open_sources(entries: list[dict[str, Any]]) -> list[tuple[Path, dict[str, Any]]]:
    """The (root, index) of each mixture source, checked to share one tokenizer and token width.

    Raises:
        InputError: a source is missing, not a prepared directory or listed twice, or the sources differ in
            tokenizer or token width (one line, naming the sources).
    """
    opened, first = [], {}
    for i, entry in enumerate(entries):
        root = Path(entry["path"])
        if not is_prepared(root):
            what = "not found" if not root.exists() else f"not a directory made by gptcli prepare (no {INDEX})"
            raise InputError(f"data.path[{i}].path {root}: {what}; a mixture reads prepared corpora")
        # Sources are told apart by their path (per-source losses, saved positions): one corpus twice would
        # merge in those and walk its windows twice per epoch; its weight is the one place to give it more.
        j = first.setdefault(root.resolve(), i)
        if j != i:
            raise InputError(f"data.path[{i}].path {root}: the same corpus as data.path[{j}]; list it once, "
                             "with the sum of the weights")
        opened.append((root, read_index(root)))
    for key, what in (("dtype", "token widths"), ("tokenizer", "tokenizers")):
        seen = {str(root): index.get(key) for root, index in opened}
        if len(set(seen.values())) > 1:
            listed = ", ".join(f"{root}: {value}" for root, value in seen.items())
            raise InputError(f"data.path: the mixture's sources have different {what} ({listed}); prepare them alike")
    return opened


def proportions(weights: Sequence[float]) -> list[float]:
    """The weights scaled by the largest: the same proportions, and sums that cannot overflow
    (two weights of 1e308 made every weighted loss inf / inf = nan)."""
    top = max(weights)
    return [w / top for w in weights]


def weighted_mean(values: Sequence[float], weights: Sequence[float]) -> float:
    """The mixture's figure from its sources': each weighed as the mixture draws it (training's
    val_loss, eval's and loss's mixture rows)."""
    return sum(w * v for v, w in zip(values, weights)) / sum(weights)


def _mix(*values: int) -> int:
    seed = 0
    for v in values:
        seed = (seed * _GOLDEN + v + 1) % 2**64
    return seed


class MixtureWindows(Dataset):
    """The windows of several sources as one index space: source s holds [offsets[s], offsets[s + 1])."""

    def __init__(self, parts: Sequence[Dataset], names: Sequence[str], weights: Sequence[float]):
        self.parts = list(parts)
        self.names = list(names)
        self.weights = list(weights)
        self.offsets = [0]
        for part in self.parts:
            self.offsets.append(self.offsets[-1] + len(part))

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, i: int):
        s = bisect.bisect_right(self.offsets, i) - 1
        return self.parts[s][i - self.offsets[s]]

    def source_of(self, i: int) -> int:
        return bisect.bisect_right(self.offsets, i) - 1


class MixtureBatchSampler(GlobalBatchSampler):
    """Batches of mixture window indices; the interface of data.WindowBatchSampler.

    With `shuffle` off (evaluation) the windows go in order, source after source.
    With several processes every rank draws every global batch (so all keep the same
    positions) and takes its slice (``split``) or its batches (``stride``).

    Training (``split``) carries the positions from epoch to epoch; an evaluation sampler
    (``stride``) starts each iteration afresh, its permutations seeded by the iteration's
    seed, so what it draws depends on that seed alone (as for a single corpus).
    """

    def __init__(self, data: MixtureWindows, batch_size: int, shuffle: bool, drop_last: bool,
                 rank: int = 0, world_size: int = 1, mode: str = "split"):
        super().__init__(len(data), batch_size, shuffle, drop_last, rank, world_size, mode)
        self.data = data
        self.sizes = [len(p) for p in data.parts]
        self.positions = [0] * len(self.sizes)  # windows drawn from each source so far
        # The permutations' seed, drawn once from the global RNG when the loader is built
        # (after the model, at the same point of a fresh and a resumed run) and saved.
        self.perm_seed = int(torch.empty((), dtype=torch.int64).random_().item()) if shuffle else 0
        self._weights = torch.tensor(data.weights, dtype=torch.float64)
        self._perms: dict[int, tuple[int, torch.Tensor]] = {}
        self._iter_seed = self.perm_seed

    def state(self) -> dict[str, Any]:
        """What a checkpoint stores: the position in every source and the permutations' seed."""
        return {"positions": list(self.positions), "perm_seed": self.perm_seed, "sources": list(self.data.names)}

    def load_state(self, state: dict[str, Any]) -> None:
        """Continue from `state()` of an earlier run.

        Raises:
            InputError: the checkpoint's mixture has other sources.
        """
        if list(state.get("sources", [])) != self.data.names:
            raise InputError(f"--resume: the checkpoint's mixture reads {state.get('sources')}, "
                             f"data.path now reads {self.data.names}; resume with the same data.path")
        self.positions = [int(p) for p in state["positions"]]
        self.perm_seed = int(state["perm_seed"])

    def _window(self, s: int) -> int:
        """The next window of source s: its position in the current permutation of the source."""
        cycle, j = divmod(self.positions[s], self.sizes[s])
        cached = self._perms.get(s)
        if cached is None or cached[0] != cycle:
            g = torch.Generator().manual_seed(_mix(self._iter_seed, s, cycle))
            cached = self._perms[s] = (cycle, torch.randperm(self.sizes[s], generator=g))
        self.positions[s] += 1
        return self.data.offsets[s] + int(cached[1][j])

    def __iter__(self) -> Iterator[list[int]]:
        resume, self._resume = self._resume, None
        seed, windows_done = resume if resume else (None, 0)
        if self.shuffle and seed is None:
            seed = int(torch.empty((), dtype=torch.int64).random_().item())  # as RandomSampler draws
        self.seed = seed
        if self.mode == "stride" and self.shuffle:
            self.positions, self._perms = [0] * len(self.sizes), {}
            self._iter_seed = _mix(self.perm_seed, seed % 2**64)
        else:
            self._iter_seed = self.perm_seed
        gb = self.global_batch
        generator = torch.Generator()
        for i in range(-(-windows_done // gb), self.num_batches()):
            size = min(gb, self.num_windows - i * gb)
            if self.shuffle:
                generator.manual_seed(_mix(seed % 2**64, i))
                sources = torch.multinomial(self._weights, size, replacement=True, generator=generator).tolist()
                batch = [self._window(s) for s in sources]
            else:
                batch = list(range(i * gb, i * gb + size))
            if self.mode == "stride" and i % self.world_size != self.rank:
                continue
            if self.mode == "split":
                batch = batch[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
            yield batch
