"""Varlen packing of micro-batches and the DataLoader plumbing that prefetches them.

A micro-batch is one packed row: sequences back to back in input_ids [1, T], positions
restarting at 0 per sequence, cu_seqlens marking the boundaries (flash-attn varlen layout).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from trainer.data.sampler import TokenBudgetSampler
from trainer.data.tokenize import TokenizedDataset
from trainer.data.workers import worker_context


class Item(NamedTuple):
    """What the collator consumes: one sequence."""
    input_ids: np.ndarray
    label: np.ndarray | None
    row_id: Any
    weight: float
    teacher: np.ndarray | None = None  # teacher probabilities (loss.kind=distill)


@dataclass
class PackedBatch:
    """One packed micro-batch: what the model takes, apart from what the loss and the logs need.

    ``inputs`` are exactly the model's keyword arguments (``model(**batch.inputs)``):
    input_ids / position_ids [1, T] int64, cu_seqlens [B+1] int32 and max_seq_len (a host int,
    so the forward needs no device sync to learn it).
    """
    inputs: dict[str, Any]
    labels: torch.Tensor  # [B, num_labels] float32 distributions; zeros for unlabelled rows
    weights: torch.Tensor  # [B] float32: 1.0 real row, 0.0 padding row (never counted in the loss)
    row_ids: list  # dataset row ids, for error messages and per-row predictions
    seq_lens: list[int]  # host copy of the lengths: token counts and FLOPs without a device sync
    text: list[str] | None = None  # decoded rows (debugging only)
    teacher: torch.Tensor | None = None  # [B, num_labels] float32 teacher probabilities, when the rows have them

    @property
    def batch_size(self) -> int:
        return len(self.seq_lens)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "PackedBatch":
        def move(v):
            return v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v

        return replace(self, inputs={k: move(v) for k, v in self.inputs.items()}, labels=move(self.labels),
                       weights=move(self.weights), teacher=move(self.teacher))

    def pin_memory(self) -> "PackedBatch":  # called by DataLoader(pin_memory=True)
        def pin(v):
            return v.pin_memory() if isinstance(v, torch.Tensor) else v

        return replace(self, inputs={k: pin(v) for k, v in self.inputs.items()}, labels=pin(self.labels),
                       weights=pin(self.weights), teacher=pin(self.teacher))


class VarlenCollator:
    """list[Item] -> PackedBatch (see docs/data.md for the exact layout)."""

    def __init__(self, num_labels: int, decode=None):
        self.num_labels = num_labels
        self.decode = decode  # optional callable ids -> str: adds "text" (debugging only)

    def __call__(self, items: Sequence[Item]) -> PackedBatch:
        if not items:
            raise ValueError("empty micro-batch")  # the sampler pads, so this is a bug upstream
        seq_lens = [len(it.input_ids) for it in items]
        ids = torch.from_numpy(np.concatenate([np.asarray(it.input_ids, dtype=np.int64) for it in items]))
        pos = torch.cat([torch.arange(n, dtype=torch.long) for n in seq_lens])
        cu = torch.zeros(len(items) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor(seq_lens), 0)
        label = torch.zeros(len(items), self.num_labels, dtype=torch.float32)
        for b, it in enumerate(items):
            if it.label is not None:
                label[b] = torch.as_tensor(it.label, dtype=torch.float32)
        teacher = None
        if all(it.teacher is not None for it in items):  # a dataset has teacher columns for every row or none
            teacher = torch.from_numpy(np.stack([np.asarray(it.teacher, dtype=np.float32) for it in items]))
        return PackedBatch(
            inputs={"input_ids": ids.unsqueeze(0), "position_ids": pos.unsqueeze(0), "cu_seqlens": cu,
                    "max_seq_len": max(seq_lens)},
            labels=label,
            weights=torch.tensor([float(it.weight) for it in items], dtype=torch.float32),
            row_ids=[it.row_id.item() if hasattr(it.row_id, "item") else it.row_id for it in items],
            seq_lens=seq_lens,
            text=[self.decode(it.input_ids) for it in items] if self.decode is not None else None,
            teacher=teacher,
        )


class TokenizedTorchDataset(Dataset):
    """Map-style view of a TokenizedDataset: index -> Item (weight 1)."""

    def __init__(self, data: TokenizedDataset):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> Item:
        return Item(self.data.tokens(i), self.data.label(i), self.data.row_ids[i], 1.0, self.data.teacher_probs(i))


class _Key(NamedTuple):
    index: int
    weight: float
    epoch: int
    step: int
    micro: int
    n_micro: int
    step_num_rows: int


class _KeyedDataset(Dataset):
    # Keys carry the weight and the step tag through the DataLoader workers.
    def __init__(self, base: Dataset):
        self.base = base

    def __getitem__(self, key: _Key) -> tuple[Item, _Key]:
        return self.base[key.index]._replace(weight=key.weight), key

    def __len__(self) -> int:
        return len(self.base)


class _KeyBatchSampler:
    """batch_sampler for DataLoader: one list of keys per micro-batch, from the sampler's
    position at iter() time (a snapshot: prefetching never moves the saved position)."""

    def __init__(self, sampler: TokenBudgetSampler, max_epochs: int | None):
        self.sampler, self.max_epochs = sampler, max_epochs

    def __iter__(self) -> Iterator[list[_Key]]:
        s = self.sampler
        start = (s.epoch, s.step, s.micro)  # snapshot: the loader moves s while we run ahead
        for epoch, step, mbs in s.iter_steps(self.max_epochs):
            n_micro = len(s.plan_step(epoch, step))
            first = start[2] if (epoch, step) == start[:2] else 0
            n_rows = s.step_num_rows(epoch, step)
            for j, mb in enumerate(mbs, start=first):
                yield [_Key(i, w, epoch, step, j, n_micro, n_rows) for i, w in zip(mb.indices, mb.weights)]


class _TaggedCollate:
    # (batch, the step tag of its first key): the tag never enters the batch itself.
    def __init__(self, collator: VarlenCollator):
        self.collator = collator

    def __call__(self, pairs) -> tuple[PackedBatch, _Key]:
        return self.collator([it for it, _ in pairs]), pairs[0][1]


@dataclass
class Step:
    epoch: int
    step: int
    num_rows: int  # real rows in the global step across ranks: divide the summed loss by this
    micro_batches: list[PackedBatch]  # this rank's micro-batches (fewer if resumed mid-step)


def make_step_loader(dataset: TokenizedDataset | Dataset, sampler: TokenBudgetSampler,
                     collator: VarlenCollator, num_workers: int = 0,
                     max_epochs: int | None = None, prefetch_factor: int = 4,
                     pin_memory: bool = False) -> Iterator[Step]:
    """Yield one Step per optimizer step, from the sampler's position up to max_epochs.

    Worker processes (num_workers > 0) prefetch and collate micro-batches. When a Step is
    handed out the sampler's position moves past it, so sampler.state_dict() taken after
    the optimizer step resumes at the following step. Start the loader only after
    sampler.load_state_dict().
    """
    if isinstance(dataset, TokenizedDataset):
        dataset = TokenizedTorchDataset(dataset)
    loader = DataLoader(_KeyedDataset(dataset), batch_sampler=_KeyBatchSampler(sampler, max_epochs),
                        collate_fn=_TaggedCollate(collator),
                        num_workers=num_workers, pin_memory=pin_memory,
                        multiprocessing_context=worker_context() if num_workers > 0 else None,
                        prefetch_factor=prefetch_factor if num_workers > 0 else None)
    current: Step | None = None
    for batch, key in loader:
        if current is None:
            current = Step(key.epoch, key.step, key.step_num_rows, [])
        current.micro_batches.append(batch)
        if key.micro == key.n_micro - 1:  # the step is complete
            sampler.set_position(current.epoch, current.step + 1)
            yield current
            current = None
