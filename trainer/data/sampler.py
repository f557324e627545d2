"""Distributed token-budget batch sampler: global steps of G rows, cut into micro-batches.

Per epoch a permutation is drawn from (seed, epoch); step s owns rows perm[s*G:(s+1)*G]
(the last step owns the remainder). With ``paired=True`` (``data.swap_ab=full``) the rows are
an original half and its twin half (row i and row i + N/2: the same comparison with A and B
exchanged), the permutation is drawn over the N/2 pairs, and step s owns pairs
perm[s*G/2:(s+1)*G/2], each row with its twin, so every optimizer step holds both
orientations of each of its comparisons. Every rank computes the same plan for the whole step
and keeps its own share, so no communication is needed and all ranks agree on the number
of micro-batches (FSDP collectives must line up). See docs/data.md for the algorithm.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np


@dataclass(frozen=True)
class MicroBatch:
    indices: list[int]  # dataset row indices
    weights: list[float]  # 1.0 real row, 0.0 padding row (never counted in the loss)

    @property
    def num_rows(self) -> int:
        return sum(1 for w in self.weights if w > 0)


class TokenBudgetSampler:
    def __init__(self, lengths, *, global_batch_rows: int, max_tokens: int, world_size: int = 1,
                 rank: int = 0, seed: int = 0, shuffle: bool = True, paired: bool = False):
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if self.lengths.ndim != 1 or len(self.lengths) == 0:
            raise ValueError("lengths must be a non-empty 1-D sequence")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if global_batch_rows < 1 or max_tokens < 1:
            raise ValueError("global_batch_rows and max_tokens must be positive")
        too_long = np.flatnonzero(self.lengths > max_tokens)
        if len(too_long):  # ingest (on_bad_row, reason too_long) should have removed these
            raise ValueError(f"{len(too_long)} rows exceed max_tokens={max_tokens} (first: row "
                             f"{too_long[0]}, {self.lengths[too_long[0]]} tokens); filter them "
                             f"at load time with load_tokenized(max_tokens=...)")
        self.num_rows = len(self.lengths)
        self.global_batch_rows, self.max_tokens = int(global_batch_rows), int(max_tokens)
        self.world_size, self.rank, self.seed, self.shuffle = world_size, rank, seed, shuffle
        self.paired = bool(paired)
        if self.paired and (self.num_rows % 2 or self.global_batch_rows % 2):
            raise ValueError(f"paired rows (data.swap_ab=full) need an even row count and an even "
                             f"global_batch_rows (a row and its twin per pair), got {self.num_rows} rows and "
                             f"global_batch_rows={self.global_batch_rows}")
        self.steps_per_epoch = math.ceil(self.num_rows / self.global_batch_rows)
        self.epoch = self.step = self.micro = 0  # position of the next micro-batch to train on
        self._plan_cache: dict = {}

    # ------------------------------------------------------------------ plan
    def _perm(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_rows)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)

    def _pair_perm(self, epoch: int) -> np.ndarray:
        half = self.num_rows // 2
        if not self.shuffle:
            return np.arange(half)
        return np.random.default_rng([self.seed, epoch, 2]).permutation(half)

    def step_rows(self, epoch: int, step: int) -> np.ndarray:
        if not 0 <= step < self.steps_per_epoch:
            raise IndexError(f"step {step} outside [0, {self.steps_per_epoch})")
        g = self.global_batch_rows
        if self.paired:  # G/2 pairs: each original row followed by its twin
            pairs = self._pair_perm(epoch)[step * g // 2:(step + 1) * g // 2]
            return np.stack([pairs, pairs + self.num_rows // 2], axis=1).reshape(-1)
        return self._perm(epoch)[step * g:(step + 1) * g]

    def step_num_rows(self, epoch: int, step: int) -> int:
        """Real rows in the whole global step (all ranks): the loss normaliser."""
        return len(self.step_rows(epoch, step))

    def plan_global(self, epoch: int, step: int) -> list[list[MicroBatch]]:
        """plan[rank][micro] for every rank of this step (identical on all ranks)."""
        key = (epoch, step)
        if key not in self._plan_cache:
            if len(self._plan_cache) > 8:
                self._plan_cache.clear()
            self._plan_cache[key] = cut_step(self.step_rows(epoch, step), self.lengths,
                                             self.world_size, self.max_tokens)
        return self._plan_cache[key]

    def plan_step(self, epoch: int, step: int) -> list[MicroBatch]:
        return self.plan_global(epoch, step)[self.rank]

    # ------------------------------------------------------------------ position
    def _normalise(self, epoch: int, step: int, micro: int = 0) -> tuple[int, int, int]:
        if step >= self.steps_per_epoch:
            epoch, step, micro = epoch + step // self.steps_per_epoch, step % self.steps_per_epoch, 0
        return epoch, step, micro

    def set_position(self, epoch: int, step: int, micro: int = 0) -> None:
        """Where the next micro-batch comes from. (epoch, steps_per_epoch) rolls to the next epoch."""
        self.epoch, self.step, self.micro = self._normalise(epoch, step, micro)

    def iter_steps(self, max_epochs: int | None = None) -> Iterator[tuple[int, int, list[MicroBatch]]]:
        """(epoch, step, this rank's remaining micro-batches) from the current position on.

        Does not move the position: the consumer calls set_position() once it has finished
        with a micro-batch/step (a DataLoader prefetches ahead of training).
        """
        epoch, step, micro = self.epoch, self.step, self.micro
        while max_epochs is None or epoch < max_epochs:
            yield epoch, step, self.plan_step(epoch, step)[micro:]
            epoch, step, micro = self._normalise(epoch, step + 1)

    def __iter__(self) -> Iterator[tuple[int, int, list[MicroBatch]]]:
        return self.iter_steps()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "micro": self.micro, "seed": self.seed,
                "global_batch_rows": self.global_batch_rows, "max_tokens": self.max_tokens,
                "world_size": self.world_size, "num_rows": self.num_rows, "shuffle": self.shuffle,
                "paired": self.paired}

    def load_state_dict(self, state: dict) -> None:
        """Resume at the saved micro-batch. Rows per step are global, so a different world size
        (or token budget) only changes how future steps are cut: accepted at a step boundary,
        refused mid-step. The row order itself (seed, rows, global batch) must match."""
        state = {"paired": False, **state}  # checkpoints from before data.swap_ab=full
        for k in ("num_rows", "global_batch_rows", "seed", "shuffle", "paired"):
            if state[k] != getattr(self, k):
                raise ValueError(f"sampler state mismatch: saved {k}={state[k]!r}, this run has "
                                 f"{getattr(self, k)!r}; the saved position means nothing here")
        if state["micro"] and (state["world_size"], state["max_tokens"]) != (self.world_size, self.max_tokens):
            raise ValueError(
                f"cannot resume mid-step (micro-batch {state['micro']} of epoch {state['epoch']} "
                f"step {state['step']}) with world_size/max_tokens {self.world_size}/{self.max_tokens}"
                f" != saved {state['world_size']}/{state['max_tokens']}; resume from a step-boundary checkpoint")
        self.set_position(state["epoch"], state["step"], state["micro"])


def cut_step(rows: np.ndarray, lengths: np.ndarray, world_size: int, max_tokens: int
             ) -> list[list[MicroBatch]]:
    """Cut one step's rows into world_size x k micro-batches, k the smallest that fits.

    Longest-first greedy (LPT): rows sorted by length descending go one by one into the
    least-loaded of W*k bins; if a row does not fit the least-loaded bin it fits none, so
    k grows by one and we retry. Bins end up nearly equal, so every (rank, micro) pair
    carries about the same tokens. Bins are then dealt to ranks in snake order by load
    (micro j takes bins jW..jW+W-1) to even out per-rank totals too. Bins left empty
    (fewer rows than W*k) get the step's shortest row with weight 0.
    """
    rows = np.asarray(rows, dtype=np.int64)
    lens = lengths[rows]
    order = rows[np.lexsort((rows, -lens))]  # longest first, ties by index: deterministic
    total, w = int(lens.sum()), world_size
    k = max(1, math.ceil(total / (w * max_tokens)))
    while True:
        bins = _lpt(order, lengths, w * k, max_tokens)
        if bins is not None:
            break
        k += 1
    pad = int(order[-1])
    loads = [sum(int(lengths[i]) for i in b) for b in bins]
    by_load = sorted(range(len(bins)), key=lambda b: (-loads[b], b))
    plan: list[list[MicroBatch]] = [[] for _ in range(w)]
    for j in range(k):
        group = by_load[j * w:(j + 1) * w]
        if j % 2:
            group = group[::-1]  # snake: heaviest of odd micro-batches goes to the lightest rank
        for r, b in enumerate(group):
            idx = bins[b] or [pad]
            plan[r].append(MicroBatch(list(idx), [1.0] * len(bins[b]) or [0.0]))
    return plan


def _lpt(order: np.ndarray, lengths: np.ndarray, n_bins: int, max_tokens: int) -> list[list[int]] | None:
    heap = [(0, b) for b in range(n_bins)]  # (load, bin id): ties go to the lowest bin id
    bins: list[list[int]] = [[] for _ in range(n_bins)]
    for i in order:
        load, b = heapq.heappop(heap)
        n = int(lengths[i])
        if load + n > max_tokens:
            return None
        bins[b].append(int(i))
        heapq.heappush(heap, (load + n, b))
    return bins
