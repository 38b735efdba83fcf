"""Where the trainer's records come from: stored records, or records the target builds as training goes.

The trainer indexes a `RecordSource` by record number. Everything its batch plan needs is known up
front, without running the target: `is_visual` (the curriculum), `lengths` (the input-noise width
of a global batch) and `hidden_size`. `source[i]` returns record i, read or built; under DDP each
rank asks only for the records of its own part of each batch.

`RecordList` wraps records already in memory (`read_shards`). `ConversationSource` trains straight
from ShareGPT/LLaVA conversations (for 7B targets, whose stored features would take hundreds of
GB): it tokenises every conversation once when built (skips counted and logged, as `train-data`
does), and `source[i]` runs the target over conversation i (`build_record`) on demand. The target's
forward is deterministic, so both sources give the trainer the same records.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Optional, Sequence

import torch

from msd_engine.train.data import Conversation, SkipCounts, build_record, tokenize_conversation
from msd_engine.train.records import DraftRecord

if TYPE_CHECKING:
    from msd_engine.engine import Engine


@dataclass
class TokenRecord:
    """A record's token ids and loss mask alone (what `vocab.frequent_tokens` counts)."""
    token_ids: torch.Tensor  # [N] long
    loss_mask: torch.Tensor  # [N]


class RecordSource(ABC):
    is_visual: list[bool]   # per record: does it hold an image span
    lengths: list[int]      # per record: sequence length N
    hidden_size: int        # feature width

    def __len__(self) -> int:
        return len(self.lengths)

    @abstractmethod
    def __getitem__(self, index: int) -> DraftRecord:
        """Record `index` on the CPU (read, or built by the target)."""

    @abstractmethod
    def token_records(self) -> Iterator:
        """Each record's token ids and loss mask, in order, without running the target."""


class RecordList(RecordSource):
    """Records already in memory (read from shards, or built by a test)."""

    def __init__(self, records: Sequence[DraftRecord]):
        if not records:
            raise ValueError("no training records")
        self.records = records
        self.hidden_size = records[0].features.shape[1]
        bad = [i for i, r in enumerate(records) if r.features.shape[1] != self.hidden_size]
        if bad:
            raise ValueError(f"record {bad[0]}: feature width {records[bad[0]].features.shape[1]} != record 0's "
                             f"{self.hidden_size}")
        self.is_visual = [r.is_visual for r in records]
        self.lengths = [r.token_ids.shape[0] for r in records]

    def __getitem__(self, index: int) -> DraftRecord:
        return self.records[index]

    def token_records(self) -> Iterator[DraftRecord]:
        return iter(self.records)


class ConversationSource(RecordSource):
    """Records built on the fly by `engine` (the target) from `conversations` (answers from the data).

    Conversations that `build_record` would skip (too long for `max_len` or the engine's cache,
    badly formatted) are dropped here, once, and counted in `skips` (each logged)."""

    def __init__(self, engine: "Engine", conversations: Sequence[Conversation], max_len: int,
                 skips: Optional[SkipCounts] = None):
        self.engine, self.max_len = engine, max_len
        self.skips = skips if skips is not None else SkipCounts()
        self.conversations: list[Conversation] = []
        self.lengths, self.is_visual = [], []
        for conv in conversations:
            checked = tokenize_conversation(engine, conv, max_len, self.skips)
            if checked is not None:
                self.conversations.append(conv)
                self.lengths.append(len(checked[0]))
                self.is_visual.append(conv.image is not None)
        if not self.conversations:
            raise ValueError(f"no usable conversations ({len(conversations)} given; skipped: {self.skips.to_dict()})")
        self.hidden_size = engine.config.text.hidden_size

    def __getitem__(self, index: int) -> DraftRecord:
        conv = self.conversations[index]
        failed = SkipCounts()
        record = build_record(self.engine, conv, self.max_len, skips=failed)
        # the same checks passed when the source was built: a failure now is a bug, not a skip
        if record is None:
            raise RuntimeError(f"conversation {conv.id} passed the checks when the source was built but was "
                               f"skipped now ({failed.to_dict()})")
        if record.token_ids.shape[0] != self.lengths[index] or record.is_visual != self.is_visual[index]:
            raise RuntimeError(f"conversation {conv.id}: record of length {record.token_ids.shape[0]} "
                               f"(visual {record.is_visual}), expected {self.lengths[index]} ({self.is_visual[index]})")
        return record

    def token_records(self) -> Iterator[TokenRecord]:
        """Token views from the tokenisation alone. Record j's token_ids[j] is the token at j+1, except
        the last one, the target's own pick after the final `</s>`: that position is left out."""
        for conv in self.conversations:
            checked = tokenize_conversation(self.engine, conv, self.max_len)
            assert checked is not None, conv.id  # it passed the same check in __init__
            ids, mask = checked
            yield TokenRecord(torch.tensor(ids[1:], dtype=torch.long), torch.tensor(mask[:-1], dtype=torch.float32))


def as_source(records) -> RecordSource:
    """A RecordSource as is; a sequence of DraftRecords wrapped in a RecordList."""
    return records if isinstance(records, RecordSource) else RecordList(records)
