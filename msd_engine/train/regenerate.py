"""`train-data --regenerate`: conversations whose answers are the target's own answers: greedy, or
sampled at a temperature (`--temperature`, seeded per conversation id and turn, so a recording split
over processes samples the same answers). When the engine has a draft loaded, the answers are
generated with speculative decoding: greedy answers are exactly plain decoding's, sampled ones follow
exactly the target's distribution, only faster.

The conversation is built in token space, one turn at a time: the template's tokens up to the
answer, then exactly the tokens the target generated for that prefix. (Decoding the answers to text
and tokenising the conversation again would not give them back: SentencePiece merges the template's
space with the first word differently, some ids do not survive a decode, and the target would then
be recorded over a sequence it never produced.)

- An answer that ends with EOS is kept as generated: its EOS is the template's end of answer. The
  template's tokens after that EOS (none for vicuna_v1, the newline for chatml) follow it.
- An answer cut at max_new_tokens is closed with the template's EOS when another turn follows (the
  next question needs a closed answer) and left open when it is the last.
- The template's own tokens (roles, questions) are tokenised from text, as `conversation_ids` does:
  each turn's are the difference of two prefix tokenisations, checked to be a prefix split.
Loss mask: 1 on each answer's tokens and its closing tokens (as `conversation_ids` masks them).
"""
from __future__ import annotations

import zlib
from typing import TYPE_CHECKING

from msd_engine.request import pixel_values_for
from msd_engine.train.data import Conversation, _Skip, expand_with_mask, template_ids

if TYPE_CHECKING:
    from msd_engine.engine import Engine


def answer_seed(seed: int, conversation_id: str, turn: int) -> int:
    """The sampling seed of one answer: fixed by the run's seed, the conversation's id and the turn."""
    return zlib.crc32(f"{seed}:{conversation_id}:{turn}".encode())


def regenerated_ids(engine: "Engine", conversation: Conversation, limit: int, max_new_tokens: int,
                    temperature: float = 0.0, seed: int = 0) -> tuple[list[int], list[int]]:
    """(expanded ids, loss mask) of `conversation` with every answer the target's own answer (greedy at
    temperature 0, else sampled) to the conversation before it; generation stops early so that the
    sequence stays within `limit` tokens."""
    cfg = engine.config
    n = 1 if conversation.image is not None else 0
    pixels = pixel_values_for(cfg, [conversation.image] if n else [])
    ids: list[int] = []        # the conversation so far, image tag unexpanded
    mask: list[int] = []
    texts: list[tuple[str, str]] = []  # (question, decoded answer): the text form, for the template's tokens
    for k, (question, _) in enumerate(conversation.turns):
        closed = template_ids(engine, texts, n) if texts else []
        prompt = template_ids(engine, texts + [(question, None)], n)
        if prompt[:len(closed)] != closed:
            raise _Skip("malformed", f"turn {k} does not tokenise as a continuation of the conversation")
        ids += prompt[len(closed):]
        mask += [0] * (len(prompt) - len(closed))
        room = limit - len(expand_with_mask(engine, ids, mask, n)[0])
        if room <= 0:
            raise _Skip("too_long", f"the prompt of turn {k} fills the {limit} tokens")
        tokens = engine.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=min(max_new_tokens, room),
                                 temperature=temperature, seed=answer_seed(seed, conversation.id, k)).token_ids
        stopped = bool(tokens) and tokens[-1] in cfg.eos_token_ids
        text = engine.tokenizer.decode(tokens[:-1] if stopped else tokens).strip()
        if not text:
            raise _Skip("no_assistant_turn", f"the target's regenerated answer to turn {k} is empty")
        texts.append((question, text))
        closing: list[int] = []
        if stopped or k < len(conversation.turns) - 1:
            eos, tail = _answer_closing(engine, texts, n, len(prompt))
            closing = tail if stopped else [eos] + tail
        ids += list(tokens) + closing
        mask += [1] * (len(tokens) + len(closing))
    return expand_with_mask(engine, ids, mask, n)


def _answer_closing(engine: "Engine", texts: list[tuple[str, str]], num_images: int,
                    prompt_len: int) -> tuple[int, list[int]]:
    """(the EOS id the template ends the last answer with, the template's tokens after it), read from
    the text form of the conversation through that answer."""
    full = template_ids(engine, texts, num_images)
    answer = full[prompt_len:]
    eos = set(engine.config.eos_token_ids)
    ends = [j for j, t in enumerate(answer) if t in eos]
    if not ends:
        raise ValueError(f"prompt template {engine.config.prompt_template!r} does not end an answer with an EOS "
                         f"token {sorted(eos)}: --regenerate cannot close the target's answers")
    return answer[ends[-1]], answer[ends[-1] + 1:]
