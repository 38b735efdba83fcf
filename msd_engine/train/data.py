"""Training data for the draft: conversations (ShareGPT / LLaVA JSON) -> target records -> shards.

`read_conversations` parses the JSON and skips bad items with a count per reason (never silently).
`build_record` formats a conversation with the target's template, runs the target once over it and
returns a `DraftRecord` whose loss mask is 1 exactly on the assistant answers (each with its `</s>`);
with `regenerate` the answers are the target's own (greedy or sampled), built in token space (`regenerate.py`).
Records are stored as sharded safetensors with a `manifest.json`, rewritten atomically after each
shard, so an interrupted `msd-engine train-data` run resumes where its last shard ended.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Optional, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from msd_engine.image import load_image
from msd_engine.request import expand_image_tokens, pixel_values_for
from msd_engine.tokenizer import PromptError, encode_prompt, format_conversation
from msd_engine.train.records import DraftRecord, record_from_target

if TYPE_CHECKING:
    from msd_engine.engine import Engine

log = logging.getLogger(__name__)

SHARD_FORMAT = "msd-engine-train"
SHARD_VERSION = "1"
MANIFEST_FILE = "manifest.json"
HUMAN_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant")


@dataclass
class Conversation:
    id: str
    turns: list[tuple[str, str]]          # (question, answer), answers non-empty
    image: Optional[Path] = None          # at most one image, tagged in the first question


@dataclass
class SkipCounts:
    malformed: int = 0
    no_assistant_turn: int = 0
    missing_image: int = 0
    unreadable_image: int = 0
    too_long: int = 0

    def add(self, reason: str, item_id: str = "?", detail: str = "") -> None:
        setattr(self, reason, getattr(self, reason) + 1)
        log.warning("skipping conversation %s (%s)%s", item_id, reason, f": {detail}" if detail else "")

    @property
    def total(self) -> int:
        return sum(asdict(self).values())

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


class _Skip(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


# ---------------------------------------------------------------------------------------------
# Reading conversations


def read_conversations(path: str | Path, image_dir: str | Path | None = None) -> tuple[list[Conversation], SkipCounts]:
    """ShareGPT- or LLaVA-style JSON -> (usable conversations, counts of the skipped ones by reason).

    Image paths are relative to `image_dir` (default: the JSON file's directory)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: data file not found")
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(items, list):
        raise ValueError(f"{path}: expected a JSON list of conversations, got {type(items).__name__}")
    root = Path(image_dir) if image_dir is not None else path.parent
    conversations, skips = [], SkipCounts()
    for n, item in enumerate(items):
        item_id = str(item.get("id", n)) if isinstance(item, dict) else str(n)
        try:
            conversations.append(_parse_item(item, item_id, root))
        except _Skip as s:
            skips.add(s.reason, item_id, s.detail)
    return conversations, skips


def _parse_item(item, item_id: str, image_root: Path) -> Conversation:
    if not isinstance(item, dict) or not isinstance(item.get("conversations"), list):
        raise _Skip("malformed", "no 'conversations' list")
    turns: list[tuple[str, str]] = []
    question: Optional[str] = None
    for msg in item["conversations"]:
        if not isinstance(msg, dict) or not isinstance(msg.get("value"), str):
            raise _Skip("malformed", "a message without a string 'value'")
        role = msg.get("from")
        if role in HUMAN_ROLES and question is None:
            question = msg["value"]
        elif role in ASSISTANT_ROLES and question is not None:
            if msg["value"].strip():
                turns.append((question, msg["value"]))
            question = None
        elif role in ("system",) and not turns and question is None:
            continue  # an empty system prompt is what the template renders anyway
        else:
            raise _Skip("malformed", f"unexpected role {role!r} (turns must alternate human, gpt)")
    if not turns:
        raise _Skip("no_assistant_turn", "no non-empty assistant answer")
    image = _image_path(item, image_root)
    tags = sum(q.count("<image>") for q, _ in turns)
    if tags > (1 if image is not None else 0) or (tags == 1 and "<image>" not in turns[0][0]):
        raise _Skip("malformed", f"{tags} <image> tag(s) for {0 if image is None else 1} image")
    return Conversation(item_id, turns, image)


def _image_path(item: dict, image_root: Path) -> Optional[Path]:
    name = item.get("image")
    if name is None:
        return None
    if not isinstance(name, str):
        raise _Skip("malformed", "'image' is not a path string")
    path = image_root / name
    if not path.is_file():
        raise _Skip("missing_image", str(path))
    try:
        load_image(path)
    except (OSError, ValueError) as e:
        raise _Skip("unreadable_image", f"{path}: {e}") from e
    return path


# ---------------------------------------------------------------------------------------------
# Records


def template_ids(engine: "Engine", turns: Sequence[tuple[str, Optional[str]]], num_images: int) -> list[int]:
    """Ids (image tags unexpanded) of `turns` rendered with the engine's prompt template."""
    cfg = engine.config
    return encode_prompt(engine.tokenizer, format_conversation(cfg.prompt_template, turns, num_images, cfg.image_token),
                         cfg.image_token, cfg.image_token_id)


def expand_with_mask(engine: "Engine", ids: list[int], mask: list[int],
                     num_images: int) -> tuple[list[int], list[int]]:
    """Each image tag expanded to the image's span (mask 0 there)."""
    cfg = engine.config
    if cfg.vision is None:
        return ids, mask
    per = cfg.vision.num_image_tokens
    expanded = expand_image_tokens(ids, cfg.image_token_id, per, num_images)
    return expanded, [m for t, m in zip(ids, mask) for _ in range(per if t == cfg.image_token_id else 1)]


def conversation_ids(engine: "Engine", turns: Sequence[tuple[str, str]], num_images: int) -> tuple[list[int], list[int]]:
    """(expanded ids, loss mask) of a conversation: mask 1 on each answer's tokens and its `</s>`.

    Answer spans are found as differences of prefix tokenisations (up to "ASSISTANT:" and up to the
    answer's end), each checked to be a prefix of the whole conversation's ids."""
    full = template_ids(engine, turns, num_images)
    mask = [0] * len(full)
    for k in range(len(turns)):
        start = template_ids(engine, list(turns[:k]) + [(turns[k][0], None)], num_images)
        end = template_ids(engine, turns[:k + 1], num_images)
        if full[:len(start)] != start or full[:len(end)] != end:
            raise _Skip("malformed", f"turn {k} does not tokenise as a prefix of the conversation")
        mask[len(start):len(end)] = [1] * (len(end) - len(start))
    return expand_with_mask(engine, full, mask, num_images)


def build_record(engine: "Engine", conversation: Conversation, max_len: int, *, regenerate: bool = False,
                 max_new_tokens: int = 512, temperature: float = 0.0, seed: int = 0,
                 skips: Optional[SkipCounts] = None) -> Optional[DraftRecord]:
    """Run the target once over the formatted conversation; None (counted in `skips`) when the
    sequence is longer than `max_len` (or the engine's cache) or cannot be formatted.

    regenerate: every answer is the target's own answer, greedy at `temperature` 0, else sampled with
    seeds drawn from `seed` (`regenerate.regenerated_ids`)."""
    try:
        ids, mask = _checked_ids(engine, conversation, max_len, regenerate, max_new_tokens, temperature, seed)
    except PromptError as e:
        _count(skips, "malformed", conversation.id, str(e))
        return None
    except _Skip as s:
        _count(skips, s.reason, conversation.id, s.detail)
        return None
    num_images = 1 if conversation.image is not None else 0
    pixels = pixel_values_for(engine.config, [conversation.image] if num_images else [])
    input_ids = torch.tensor(ids, device=engine.device)
    first_answer = mask.index(1)
    record = record_from_target(engine.model, engine.cache, input_ids,
                                None if pixels is None else pixels.to(engine.device), first_answer,
                                engine.config.image_token_id)
    # the records' convention (records.py): loss_mask[j] marks target position j as an assistant token
    record.loss_mask = torch.tensor(mask, dtype=torch.float32)
    return _to_cpu(record)


def tokenize_conversation(engine: "Engine", conversation: Conversation, max_len: int,
                          skips: Optional[SkipCounts] = None) -> Optional[tuple[list[int], list[int]]]:
    """(expanded ids, loss mask) exactly as `build_record` (without regeneration) would record them, or
    None (counted in `skips`) where it would skip; no target forward, so it is cheap."""
    try:
        return _checked_ids(engine, conversation, max_len)
    except PromptError as e:
        _count(skips, "malformed", conversation.id, str(e))
    except _Skip as s:
        _count(skips, s.reason, conversation.id, s.detail)
    return None


def _checked_ids(engine: "Engine", conversation: Conversation, max_len: int, regenerate: bool = False,
                 max_new_tokens: int = 0, temperature: float = 0.0, seed: int = 0) -> tuple[list[int], list[int]]:
    limit = min(max_len, engine.cache.max_seq_len)
    if regenerate:
        from msd_engine.train.regenerate import regenerated_ids  # it builds on this module's helpers

        ids, mask = regenerated_ids(engine, conversation, limit, max_new_tokens, temperature, seed)
    else:
        ids, mask = conversation_ids(engine, conversation.turns, 1 if conversation.image is not None else 0)
    if len(ids) > limit:
        raise _Skip("too_long", f"{len(ids)} tokens > {limit}")
    return ids, mask


def _to_cpu(r: DraftRecord) -> DraftRecord:
    def cpu(t):
        return None if t is None else t.cpu()
    return DraftRecord(r.token_ids.cpu(), r.features.cpu(), r.loss_mask.cpu(), cpu(r.image_rows), cpu(r.is_image),
                       r.is_visual)


def _count(skips: Optional[SkipCounts], reason: str, item_id: str, detail: str) -> None:
    if skips is not None:
        skips.add(reason, item_id, detail)
    else:
        log.warning("skipping conversation %s (%s): %s", item_id, reason, detail)


# ---------------------------------------------------------------------------------------------
# Shards


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def _record_tensors(records: Sequence[DraftRecord]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for i, r in enumerate(records):
        out[f"{i}.token_ids"] = r.token_ids.to(torch.long)
        out[f"{i}.features"] = r.features
        out[f"{i}.loss_mask"] = r.loss_mask.to(torch.float32)
        if r.image_rows is not None:
            out[f"{i}.image_rows"] = r.image_rows
            out[f"{i}.is_image"] = r.is_image
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


@dataclass
class ShardWriter:
    """Buffers records and writes a shard (then the manifest) every `records_per_shard` records.

    `position` counts the conversations whose outcome (record or skip) is in completed shards; a
    writer opened on a directory with a manifest resumes there."""
    out_dir: Path
    records_per_shard: int
    source: dict = field(default_factory=dict)  # identifies the dataset (a resume must match it)
    position: int = 0
    skips: SkipCounts = field(default_factory=SkipCounts)
    shards: list = field(default_factory=list)
    _buffer: list = field(default_factory=list)
    _pending: SkipCounts = field(default_factory=SkipCounts)

    def __post_init__(self) -> None:
        if self.records_per_shard < 1:
            raise ValueError(f"records_per_shard must be >= 1, got {self.records_per_shard}")
        self.out_dir = Path(self.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if (self.out_dir / MANIFEST_FILE).is_file():
            manifest = read_manifest(self.out_dir)
            if self.source and manifest.get("source") and manifest["source"] != self.source:
                raise ValueError(f"{self.out_dir / MANIFEST_FILE} belongs to another dataset "
                                 f"({manifest['source']}); use a fresh output directory")
            self.position, self.shards = manifest["position"], manifest["shards"]
            self.skips = SkipCounts(**manifest["skips"])

    @property
    def complete(self) -> bool:
        return bool((self.out_dir / MANIFEST_FILE).is_file() and read_manifest(self.out_dir).get("complete"))

    def add(self, record: Optional[DraftRecord], position: int, skipped: Optional[SkipCounts] = None) -> None:
        """The outcome of conversation `position - 1` (a record, or None with its skips counted)."""
        if record is not None:
            self._buffer.append(record)
        if skipped is not None:
            for k, v in skipped.to_dict().items():
                setattr(self._pending, k, getattr(self._pending, k) + v)
        if len(self._buffer) >= self.records_per_shard:
            self._flush(position, complete=False)

    def close(self, position: int) -> None:
        self._flush(position, complete=True)

    def _flush(self, position: int, complete: bool) -> None:
        if self._buffer:
            name = shard_name(len(self.shards))
            h = self._buffer[0].features.shape[1]
            meta = {"format": SHARD_FORMAT, "version": SHARD_VERSION, "hidden_size": str(h),
                    "is_visual": json.dumps([r.is_visual for r in self._buffer])}
            tmp = self.out_dir / (name + ".tmp")
            save_file(_record_tensors(self._buffer), str(tmp), metadata=meta)
            os.replace(tmp, self.out_dir / name)
            self.shards.append({"file": name, "records": len(self._buffer), "hidden_size": h})
            self._buffer = []
        for k, v in self._pending.to_dict().items():
            setattr(self.skips, k, getattr(self.skips, k) + v)
        self._pending = SkipCounts()
        self.position = position
        _write_json_atomic(self.out_dir / MANIFEST_FILE, {
            "format": SHARD_FORMAT, "version": SHARD_VERSION, "source": self.source, "position": position,
            "complete": complete, "skips": self.skips.to_dict(), "shards": self.shards})


def write_shards(records: Iterable[DraftRecord], out_dir: str | Path, records_per_shard: int) -> list[Path]:
    """Write `records` as shards + manifest into a fresh `out_dir`; returns the shard paths."""
    out_dir = Path(out_dir)
    if (out_dir / MANIFEST_FILE).exists():
        raise ValueError(f"{out_dir} already holds {MANIFEST_FILE}; write into a fresh directory")
    writer = ShardWriter(out_dir, records_per_shard)
    n = 0
    for n, record in enumerate(records, 1):
        writer.add(record, n)
    writer.close(n)
    return [out_dir / s["file"] for s in writer.shards]


def read_manifest(shard_dir: str | Path) -> dict:
    """The manifest, with every listed shard checked to exist (a clear error naming a missing one)."""
    path = Path(shard_dir) / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no shard manifest (run msd-engine train-data first)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if manifest.get("format") != SHARD_FORMAT or manifest.get("version") != SHARD_VERSION:
        raise ValueError(f"{path}: not a {SHARD_FORMAT} v{SHARD_VERSION} manifest")
    for s in manifest["shards"]:
        if not (path.parent / s["file"]).is_file():
            raise FileNotFoundError(f"{path.parent / s['file']}: shard listed in {path} is missing")
    return manifest


def read_shards(shard_dir: str | Path, hidden_size: Optional[int] = None) -> list[DraftRecord]:
    """All records of the shards listed in the manifest, in order."""
    shard_dir = Path(shard_dir)
    records: list[DraftRecord] = []
    for s in read_manifest(shard_dir)["shards"]:
        records.extend(_read_shard(shard_dir / s["file"], s["records"], hidden_size))
    return records


def _read_shard(path: Path, count: int, hidden_size: Optional[int]) -> list[DraftRecord]:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own SafetensorError (not an OSError) on bad bytes
        raise ValueError(f"{path}: corrupt shard ({e})") from e
    if meta.get("format") != SHARD_FORMAT or meta.get("version") != SHARD_VERSION:
        raise ValueError(f"{path}: not a {SHARD_FORMAT} v{SHARD_VERSION} shard (metadata {meta})")
    h = int(meta["hidden_size"])
    if hidden_size is not None and h != hidden_size:
        raise ValueError(f"{path}: features of width {h}, but the target's hidden size is {hidden_size} "
                         "(shards recorded with another model)")
    visual = json.loads(meta["is_visual"])
    if len(visual) != count:
        raise ValueError(f"{path}: holds {len(visual)} records, the manifest says {count}")
    out = []
    for i, v in enumerate(visual):
        try:
            out.append(DraftRecord(tensors[f"{i}.token_ids"], tensors[f"{i}.features"], tensors[f"{i}.loss_mask"],
                                   tensors.get(f"{i}.image_rows"), tensors.get(f"{i}.is_image"), bool(v)))
        except KeyError as e:
            raise ValueError(f"{path}: record {i} lacks tensor {e}") from e
        if out[-1].features.shape[1] != h:
            raise ValueError(f"{path}: record {i} has width {out[-1].features.shape[1]} != metadata {h}")
    return out


def build_shards(engine: "Engine", conversations: Sequence[Conversation], out_dir: str | Path, *, max_len: int,
                 records_per_shard: int, regenerate: bool = False, max_new_tokens: int = 512,
                 temperature: float = 0.0, seed: int = 0, source: Optional[dict] = None,
                 progress: bool = False) -> ShardWriter:
    """Record every conversation into shards, resuming after the last completed shard in out_dir."""
    writer = ShardWriter(Path(out_dir), records_per_shard, source or {})
    if writer.position > len(conversations):
        raise ValueError(f"{Path(out_dir) / MANIFEST_FILE} covers {writer.position} conversations, "
                         f"the data has only {len(conversations)}")
    todo = range(writer.position, len(conversations))
    if progress:
        from tqdm import tqdm
        todo = tqdm(todo, total=len(conversations), initial=writer.position, desc="recording", unit="conv")
    for n in todo:
        skipped = SkipCounts()
        record = build_record(engine, conversations[n], max_len, regenerate=regenerate,
                              max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, skips=skipped)
        writer.add(record, n + 1, skipped)
    writer.close(len(conversations))
    return writer
