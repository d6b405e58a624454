"""What every batch sampler of training windows shares: global batches, per-rank shares, resume points.

A global batch is ``batch_size * world_size`` windows cut into per-rank slices
(``split``, training), or ``batch_size`` windows with whole batches going
round-robin to the ranks (``stride``, evaluation). Subclasses implement
``__iter__``.
"""

from __future__ import annotations

from torch.utils.data import Sampler


class GlobalBatchSampler(Sampler[list[int]]):
    def __init__(self, num_windows: int, batch_size: int, shuffle: bool, drop_last: bool,
                 rank: int = 0, world_size: int = 1, mode: str = "split"):
        self.num_windows = num_windows
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.mode = mode  # "split" or "stride"
        self.seed: int | None = None  # seed of the epoch being iterated
        self._resume: tuple[int | None, int] | None = None

    @property
    def global_batch(self) -> int:
        return self.batch_size * (self.world_size if self.mode == "split" else 1)

    def num_batches(self) -> int:
        """Global batches per epoch."""
        if self.drop_last:
            return self.num_windows // self.global_batch
        return -(-self.num_windows // self.global_batch)

    def __len__(self) -> int:
        n = self.num_batches()
        if self.mode == "stride":
            return len(range(self.rank, n, self.world_size))
        return n

    def resume(self, seed: int | None, windows_done: int) -> None:
        """Make the next iteration replay the epoch of `seed` after its first `windows_done` windows."""
        self._resume = (seed, windows_done)
