"""Runtime tokenizer: a thin layer over `tokenizers`, prompt templates, and streaming detokenisation.

BOS is ours to add, never the post-processor's: `encode` runs the tokenizer without special-token
post-processing and prepends BOS only when asked, so it is never added twice. The BOS id comes from
the tokenizer.json post-processor (the template that would have added it) unless given explicitly.

Prompts follow LLaVA: `format_prompt` renders the chat template (vicuna_v1 with an EMPTY system
prompt, as MSD evaluates), and `encode_prompt` tokenises it like LLaVA's `tokenizer_image_token`:
the text is split on the image tag, each chunk is encoded on its own (so SentencePiece gives the
chunk after an image its own leading "▁"), and each tag becomes exactly one image token id.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Optional, Sequence

import tokenizers
from tokenizers import models

TEMPLATES = ("vicuna_v1", "chatml", "plain")
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_REPLACEMENT_CHAR = "\ufffd"


class PromptError(ValueError):
    """A prompt that cannot be formatted or tokenised as given (e.g. image tags vs images)."""


class Tokenizer:
    """Encode/decode with explicit BOS handling."""

    def __init__(self, backend: tokenizers.Tokenizer, bos_id: Optional[int]):
        self._backend = backend
        self._vocab_size = backend.get_vocab_size(with_added_tokens=True)
        if bos_id is not None and not 0 <= bos_id < self._vocab_size:
            raise ValueError(f"bos_id {bos_id} outside the vocabulary of {self._vocab_size}")
        self.bos_id = bos_id
        # Byte-fallback pieces (<0x..>) decode as a group: a streamed group is only final once a
        # non-byte token closes it.
        self.byte_token_ids: frozenset[int] = frozenset(
            i for t, i in backend.get_vocab(with_added_tokens=False).items() if _BYTE_PIECE.fullmatch(t)
        ) if isinstance(backend.model, models.BPE) and backend.model.byte_fallback else frozenset()

    @classmethod
    def from_file(cls, path: str | Path, *, bos_id: Optional[int] = None) -> "Tokenizer":
        """Load a tokenizer.json; BOS is the token its post-processor would add (or `bos_id`)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer file at {path}")
        text = path.read_text(encoding="utf-8")
        try:
            data = json.loads(text)
            backend = tokenizers.Tokenizer.from_str(text)
        except Exception as e:  # json.JSONDecodeError, or tokenizers' own Exception on a bad schema
            raise ValueError(f"{path} is not a valid tokenizer.json: {e}") from e
        return cls(backend, bos_id if bos_id is not None else _bos_from_post_processor(data.get("post_processor")))

    @classmethod
    def from_str(cls, tokenizer_json: str, *, bos_id: Optional[int] = None) -> "Tokenizer":
        backend = tokenizers.Tokenizer.from_str(tokenizer_json)
        data = json.loads(tokenizer_json)
        return cls(backend, bos_id if bos_id is not None else _bos_from_post_processor(data.get("post_processor")))

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return self._vocab_size

    @property
    def adds_bos(self) -> bool:
        """Whether prompts for this model start with BOS (the tokenizer file's own template adds one)."""
        return self.bos_id is not None

    def encode(self, text: str, add_bos: bool) -> list[int]:
        ids = self._backend.encode(text, add_special_tokens=False).ids
        if not add_bos:
            return ids
        if self.bos_id is None:
            raise ValueError("add_bos=True but this tokenizer has no BOS token")
        return [self.bos_id] + ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`. Ids past the tokenizer's vocabulary (a model's padded embedding rows) have
        no text and decode to nothing, as in transformers."""
        ids = [int(i) for i in ids]
        if ids and min(ids) < 0:
            raise ValueError(f"cannot decode negative token id {min(ids)}")
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> Optional[int]:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> Optional[str]:
        return self._backend.id_to_token(token_id)


def _bos_from_post_processor(pp: Optional[dict[str, Any]]) -> Optional[int]:
    """The id a TemplateProcessing puts before the single sequence, if any (also inside a Sequence)."""
    if pp is None:
        return None
    if pp.get("type") == "Sequence":
        found = [_bos_from_post_processor(p) for p in pp.get("processors", [])]
        return next((b for b in found if b is not None), None)
    if pp.get("type") != "TemplateProcessing" or not pp.get("single"):
        return None
    first = pp["single"][0]
    if "SpecialToken" not in first:
        return None
    ids = pp["special_tokens"][first["SpecialToken"]["id"]]["ids"]
    if len(ids) != 1:
        raise ValueError(f"post-processor starts with {first['SpecialToken']['id']!r} = {ids}, not one BOS id")
    return int(ids[0])


class StreamDecoder:
    """Incremental detokenisation: `push` returns the text a new token finalises, `flush` the rest.

    The concatenation of all returned pieces equals `tokenizer.decode(all_ids)`. It decodes a
    window [prefix, end): tokens [prefix, read) were already emitted and give the next token its
    context (SentencePiece's decoder strips the leading space of the FIRST token decoded, so a
    token decoded alone would lose its space). Text is held back while it ends in an incomplete
    UTF-8 character ("\\ufffd") or while a byte-fallback group may still grow.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        if token_id in self._tok.byte_token_ids:
            return ""
        return self._advance(final=False)

    def flush(self) -> str:
        """The text still held back (an unfinished character decodes as "\\ufffd", as in `decode`)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self._read == len(self._ids):
            return ""
        done = self._tok.decode(self._ids[self._prefix:self._read], self._skip)
        text = self._tok.decode(self._ids[self._prefix:], self._skip)
        if not final and text.endswith(_REPLACEMENT_CHAR):
            return ""
        # Window boundaries fall on closed characters and byte groups, so decoding is prefix-stable.
        assert text.startswith(done), (done, text)
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(done):]


# ---------------------------------------------------------------------------------------------
# Prompts


def format_prompt(template: str, question: str, num_images: int, image_token: str = "<image>") -> str:
    """One user turn, ready for the assistant's answer. Missing image tags are prepended."""
    return format_conversation(template, [(question, None)], num_images, image_token)


def format_conversation(template: str, turns: Sequence[tuple[str, Optional[str]]], num_images: int,
                        image_token: str = "<image>") -> str:
    """A conversation of (question, answer) turns; only the last answer may be None (to be generated).

    vicuna_v1 follows LLaVA's conv_vicuna_v1 with system "": sep " " after questions, "</s>" after
    answers: " USER: q1 ASSISTANT: a1</s>USER: q2 ASSISTANT:".
    """
    if template not in TEMPLATES:
        raise ValueError(f"unknown prompt template {template!r}; choose from {TEMPLATES}")
    if not turns:
        raise PromptError("a conversation needs at least one turn")
    if any(answer is None for _, answer in turns[:-1]):
        raise PromptError("only the last turn may leave its answer empty (None)")
    if any(answer is not None and image_token in answer for _, answer in turns):
        raise PromptError(f"answers cannot hold {image_token} tags")
    questions = _place_image_tags([q for q, _ in turns], num_images, image_token)
    answers = [a for _, a in turns]
    if template == "vicuna_v1":
        return _render_vicuna(questions, answers)
    if template == "chatml":
        return _render_chatml(questions, answers)
    if len(turns) != 1 or answers[0] is not None:
        raise PromptError("template 'plain' has no turn structure: give one question and no answer")
    return questions[0]


def _place_image_tags(questions: list[str], num_images: int, image_token: str) -> list[str]:
    if num_images < 0:
        raise PromptError(f"num_images must be >= 0, got {num_images}")
    tags = sum(q.count(image_token) for q in questions)
    if tags == 0 and num_images > 0:
        return [(image_token + "\n") * num_images + questions[0]] + questions[1:]
    if tags != num_images:
        raise PromptError(
            f"prompt has {tags} {image_token} tag{'' if tags == 1 else 's'} but {num_images} "
            f"image{' was' if num_images == 1 else 's were'} given")
    return questions


def _render_vicuna(questions: list[str], answers: list[Optional[str]]) -> str:
    # LLaVA's SeparatorStyle.TWO: system + sep, then "ROLE: msg" + sep/sep2, or "ROLE:" when empty.
    out = " "  # the empty system prompt, then sep
    for question, answer in zip(questions, answers):
        out += f"USER: {question} " if question else "USER:"
        out += f"ASSISTANT: {answer}</s>" if answer else "ASSISTANT:"
    return out


def _render_chatml(questions: list[str], answers: list[Optional[str]]) -> str:
    out = ""
    for question, answer in zip(questions, answers):
        out += f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
        if answer is not None:
            out += f"{answer}<|im_end|>\n"
    return out


def encode_prompt(tokenizer: Tokenizer, prompt_text: str, image_token: str, image_token_id: Optional[int],
                  *, add_bos: Optional[bool] = None) -> list[int]:
    """Ids of a formatted prompt, each image tag as exactly one `image_token_id`.

    As LLaVA's `tokenizer_image_token`: the chunks between tags are encoded separately (each with
    SentencePiece's leading "▁"), BOS only at the start. `add_bos=None` follows the tokenizer
    (BOS when its file adds one, as LLaVA's Llama tokenizer does).
    """
    chunks = prompt_text.split(image_token)
    if len(chunks) > 1 and image_token_id is None:
        raise PromptError(f"prompt has {len(chunks) - 1} {image_token} tag(s) but the model has no image token id")
    known = tokenizer.token_to_id(image_token)
    if image_token_id is not None and known is not None and known != image_token_id:
        raise ValueError(f"image token {image_token!r} is id {known} in the tokenizer, not {image_token_id}")
    if add_bos is None:
        add_bos = tokenizer.adds_bos
    ids = tokenizer.encode(chunks[0], add_bos=add_bos)
    for chunk in chunks[1:]:
        assert image_token_id is not None
        ids.append(image_token_id)
        ids.extend(tokenizer.encode(chunk, add_bos=False))
    return ids
