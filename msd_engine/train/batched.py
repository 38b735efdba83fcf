"""`train-data --regenerate --batch-size N`: the target's greedy answers to many single-turn
conversations at once, with the target's features captured on the way.

The engine decodes one sequence at a time (it is built for batch-1 latency); recording thousands of
answers that way leaves most of a CPU's arithmetic unused. Here transformers' `generate` runs the
same converted weights (`convert.to_transformers`) over a left-padded batch, and a hook on the final
RMSNorm keeps the post-norm hidden states of every position it computes: the prompt's in the first
step, one per row in each step after. That is every feature a record needs except the last
generated token's (generation stops before feeding it), so each record ends one token early: its
sequence is the prompt and the answer without its last token, and that last token (the target's
greedy choice there) is the record's "next token", as `record_from_target` makes it.

Greedy only: the answers are the target's greedy answers, computed in a batch; where two logits tie
within float rounding the batch's arithmetic may pick the other one than batch-1 decoding would.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional, Sequence

import torch

from msd_engine.request import pixel_values_for
from msd_engine.spec.speculative import prompt_draft_inputs
from msd_engine.train.data import Conversation, ShardWriter, SkipCounts, _Skip, expand_with_mask, template_ids
from msd_engine.train.records import DraftRecord

if TYPE_CHECKING:
    from msd_engine.engine import Engine


@dataclass
class _Prompt:
    position: int                    # index of the conversation in the input list
    conversation: Conversation
    ids: list[int]                   # expanded prompt ids
    room: int                        # new tokens allowed (max_new_tokens, within max_len)


def record_batched(engine: "Engine", hf_model, conversations: Sequence[Conversation], writer: ShardWriter, *,
                   max_len: int, max_new_tokens: int, batch_size: int, progress: bool = False) -> ShardWriter:
    """Record the target's greedy answers to `conversations` (single-turn) in batches of `batch_size`,
    resuming after `writer.position`; records go to `writer` in the input order."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_new_tokens < 2:
        raise ValueError(f"max_new_tokens must be >= 2 (a record ends one token before the answer does), "
                         f"got {max_new_tokens}")
    todo = range(writer.position, len(conversations))
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(conversations), initial=writer.position, desc="recording (batched)", unit="conv")
    for start in range(todo.start, todo.stop, batch_size):
        chunk = range(start, min(start + batch_size, todo.stop))
        skips = SkipCounts()
        prompts = [p for p in (_prompt(engine, n, conversations[n], max_len, max_new_tokens, skips) for n in chunk)
                   if p is not None]
        records = dict(_answer_batch(engine, hf_model, prompts, skips))
        for n in chunk:  # in input order; all of a chunk's skips go with its first outcome
            writer.add(records.get(n), n + 1, skips if n == chunk.start else None)
        if bar is not None:
            bar.update(len(chunk))
    writer.close(len(conversations))
    if bar is not None:
        bar.close()
    return writer


def _prompt(engine: "Engine", position: int, conversation: Conversation, max_len: int, max_new_tokens: int,
            skips: SkipCounts) -> Optional[_Prompt]:
    num_images = 1 if conversation.image is not None else 0
    try:
        if len(conversation.turns) != 1:
            raise _Skip("malformed", f"{len(conversation.turns)} turns: batched recording answers single-turn "
                                     "conversations (record multi-turn ones without --batch-size)")
        ids = template_ids(engine, [(conversation.turns[0][0], None)], num_images)
        expanded, _ = expand_with_mask(engine, ids, [0] * len(ids), num_images)
        room = min(max_len, engine.cache.max_seq_len) - len(expanded)
        if room < 2:
            raise _Skip("too_long", f"the prompt ({len(expanded)} tokens) leaves no room for an answer in {max_len}")
    except _Skip as s:
        skips.add(s.reason, conversation.id, s.detail)
        return None
    return _Prompt(position, conversation, expanded, min(room, max_new_tokens))


def _answer_batch(engine: "Engine", hf_model, prompts: list[_Prompt],
                  skips: SkipCounts) -> Iterator[tuple[int, DraftRecord]]:
    """Text-only and image prompts go in separate sub-batches (an image adds hundreds of positions)."""
    for group in ([p for p in prompts if p.conversation.image is None],
                  [p for p in prompts if p.conversation.image is not None]):
        if group:
            yield from _generate_group(engine, hf_model, group, skips)


def _generate_group(engine: "Engine", hf_model, group: list[_Prompt],
                    skips: SkipCounts) -> Iterator[tuple[int, DraftRecord]]:
    from msd_engine.convert.to_transformers import input_embeds

    cfg = engine.config
    pad = cfg.eos_token_ids[0]
    ids, attention = left_padded([p.ids for p in group], pad)                             # [B, L] each
    width = ids.shape[1]
    images = [p.conversation.image for p in group if p.conversation.image is not None]
    pixels = pixel_values_for(cfg, images) if images else None
    captured: list[torch.Tensor] = []
    norm = hf_model.model.language_model.norm
    hook = norm.register_forward_hook(lambda _m, _i, out: captured.append(out.detach().float()))
    try:
        with torch.inference_mode():
            embeds = input_embeds(hf_model, cfg, ids, pixels)                               # [B, L, H]
            out = hf_model.generate(inputs_embeds=embeds, attention_mask=attention,
                                    max_new_tokens=max(p.room for p in group), do_sample=False,
                                    temperature=None, top_p=None, top_k=None,
                                    eos_token_id=list(cfg.eos_token_ids), pad_token_id=pad, cache_implementation="static")
    finally:
        hook.remove()
    prefill, steps = captured[0], captured[1:]                                           # [B, L, H], [B, 1, H] each
    eos = set(cfg.eos_token_ids)
    for b, p in enumerate(group):
        answer = _answer(out[b].tolist(), eos, p.room)
        if len(answer) < 2:
            skips.add("no_assistant_turn", p.conversation.id, "the target's answer is shorter than two tokens")
            continue
        # features of the prompt, then of every answer token but the last (it was never fed back)
        feats = torch.cat([prefill[b, width - len(p.ids):]] + [s[b] for s in steps[:len(answer) - 1]])
        row_embeds = embeds[b, width - len(p.ids):]
        yield p.position, _record(p, answer, feats, row_embeds, cfg.image_token_id)


def left_padded(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows left-padded with `pad` to the longest: (ids [B, L], attention mask [B, L], 0 on padding)."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + list(r) for r in rows])
    attention = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, attention


def _answer(tokens: list[int], eos: set[int], room: int) -> list[int]:
    """A row's generated tokens through its first EOS (the rest is padding), at most `room`."""
    for j, t in enumerate(tokens[:room]):
        if t in eos:
            return tokens[:j + 1]
    return tokens[:room]


def _record(p: _Prompt, answer: list[int], features: torch.Tensor, prompt_embeds: torch.Tensor,
            image_token_id: Optional[int]) -> DraftRecord:
    seq = torch.tensor(p.ids + answer[:-1])                                                   # [N]
    n = seq.shape[0]
    assert features.shape[0] == n, (features.shape, n)
    # the answer's rows are text, so the prompt's embeddings are all the image rows there are
    embeds = torch.cat([prompt_embeds.float(), prompt_embeds.new_zeros(n - len(p.ids), prompt_embeds.shape[1])])
    token_ids, rows, is_image = prompt_draft_inputs(seq, embeds, answer[-1], image_token_id)
    mask = torch.zeros(n)
    mask[len(p.ids):] = 1  # target positions of the answer (the convention of records.py)
    visual = bool(is_image.any())
    return DraftRecord(token_ids.clone(), features.clone(), mask, rows.clone() if visual else None,
                       is_image.clone() if visual else None, visual)


def load_hf_target(model_dir: Path, dtype: torch.dtype):
    """The converted target as transformers' LLaVA in `dtype` (the batched generator)."""
    try:
        import transformers  # noqa: F401
    except ImportError as exc:
        raise RuntimeError("batched recording (--batch-size, the demo recipe) runs transformers' generate: "
                           "pip install 'msd-engine[train]'") from exc
    from msd_engine.convert.to_transformers import build_hf_llava

    return build_hf_llava(Path(model_dir), dtype)[0]
