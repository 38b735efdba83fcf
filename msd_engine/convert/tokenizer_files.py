"""Offline builders of `tokenizer.json` (the `tokenizers` format the runtime loads).

Sources: a SentencePiece `tokenizer.model` (LLaVA-1.5 / Vicuna / Llama-2), or the tokenizer
metadata of a GGUF file. SentencePiece and GGUF are optional extras, imported inside functions.

The SentencePiece builder reproduces the "legacy" Llama fast tokenizer that llava-hf ships, which
encodes exactly like the slow SentencePiece tokenizer the original LLaVA uses (`use_fast=False`):
- normalizer `Prepend("▁")` + `Replace(" ", "▁")`, no pre-tokenizer. Every text segment between
  special tokens gets one "▁", even when it already starts with a space, as SentencePiece's
  `add_dummy_prefix` does (`Metaspace` would not add it there: " USER" would tokenise differently);
- BPE with byte fallback; merges ranked by the SCORE of the merged piece, as SentencePiece ranks
  them (Llama's "▁▁" has score -1e9 but a low id: ranking by id would merge it first);
- decoder Replace("▁", " ") + ByteFallback + Fuse + Strip(one leading space);
- a TemplateProcessing post-processor that adds BOS.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

SPIECE_SPACE = "\u2581"
# Piece types, shared by sentencepiece_model.proto and llama.cpp's `tokenizer.ggml.token_type`.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_SPM_BPE = 2  # TrainerSpec.ModelType.BPE

# Split regexes by `tokenizer.ggml.pre`, matching llama.cpp (llama-vocab.cpp) and the models'
# own tokenizer.json files.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT2_PRE = ("default", "gpt2")
_SMOLLM_PRE = ("smollm",)
_LLAMA3_PRE = ("llama-bpe", "llama3", "llama-v3")
SUPPORTED_GGUF_PRE = _GPT2_PRE + _SMOLLM_PRE + _LLAMA3_PRE


def tokenizer_json_from_sentencepiece(model_path: Path) -> str:
    """tokenizer.json text for a Llama-style SentencePiece BPE `tokenizer.model` (BOS added)."""
    proto = _read_spm_proto(Path(model_path))
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    if trainer.model_type != _SPM_BPE:
        raise ValueError(f"{model_path}: trainer_spec.model_type = {trainer.model_type}; only BPE (2) is supported")
    if norm.precompiled_charsmap or norm.remove_extra_whitespaces:
        raise ValueError(
            f"{model_path}: normalizer_spec {norm.name!r} (charsmap {len(norm.precompiled_charsmap)} bytes, "
            f"remove_extra_whitespaces={norm.remove_extra_whitespaces}) is not the Llama identity normalizer"
        )
    pieces = [p.piece for p in proto.pieces]
    return _spm_style_tokenizer(
        pieces=pieces,
        scores=[p.score for p in proto.pieces],
        types=[p.type for p in proto.pieces],
        unk_id=_optional_id(trainer.unk_id, len(pieces)),
        bos_id=_optional_id(trainer.bos_id, len(pieces)),
        add_bos=True,
        add_prefix_space=norm.add_dummy_prefix,
        byte_fallback=trainer.byte_fallback,
    ).to_str()


def tokenizer_json_from_gguf(path: Path) -> str:
    """tokenizer.json text from a GGUF's `tokenizer.ggml.*` metadata ("gpt2" or "llama" vocabularies)."""
    meta = _read_gguf_tokenizer_metadata(Path(path))
    kind = meta.get("tokenizer.ggml.model")
    if kind == "gpt2":
        return _gguf_byte_level_tokenizer(meta, path).to_str()
    if kind == "llama":
        tokens = _required(meta, "tokenizer.ggml.tokens", path)
        return _spm_style_tokenizer(
            pieces=tokens,
            scores=_required(meta, "tokenizer.ggml.scores", path),
            types=_required(meta, "tokenizer.ggml.token_type", path),
            unk_id=meta.get("tokenizer.ggml.unknown_token_id"),
            bos_id=meta.get("tokenizer.ggml.bos_token_id"),
            # llama.cpp adds BOS to a SentencePiece vocabulary unless the file says otherwise.
            add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", True)),
            add_prefix_space=bool(meta.get("tokenizer.ggml.add_space_prefix", True)),
            byte_fallback=BYTE in meta["tokenizer.ggml.token_type"],
        ).to_str()
    raise ValueError(f"{path}: unsupported tokenizer.ggml.model = {kind!r} (supported: 'gpt2', 'llama')")


def ensure_added_token(tokenizer_json: str, token: str, token_id: int) -> str:
    """Make `token` a special added token with id `token_id`, appending it if it is new.

    A new token can only take the next free id (the current vocab size): tokenizers assigns
    added-token ids in order, so a gap cannot be expressed.
    """
    tok = Tokenizer.from_str(tokenizer_json)
    existing = tok.token_to_id(token)
    size = tok.get_vocab_size(with_added_tokens=True)
    if existing is not None and existing != token_id:
        raise ValueError(f"token {token!r} already has id {existing}, not the requested id {token_id}")
    if existing is None and token_id < size:
        raise ValueError(f"cannot add {token!r} as id {token_id}: that id is {tok.id_to_token(token_id)!r}")
    if existing is None and token_id > size:
        raise ValueError(f"cannot add {token!r} as id {token_id}: the next free id is {size}")
    tok.add_special_tokens([AddedToken(token, normalized=False, special=True)])
    got = tok.token_to_id(token)
    assert got == token_id, f"{token!r} got id {got}, expected {token_id}"
    return tok.to_str()


# ---------------------------------------------------------------------------------------------
# SentencePiece-style vocabularies (tokenizer.model, or GGUF "llama")


def _spm_style_tokenizer(
    *,
    pieces: Sequence[str],
    scores: Sequence[float],
    types: Sequence[int],
    unk_id: int | None,
    bos_id: int | None,
    add_bos: bool,
    add_prefix_space: bool,
    byte_fallback: bool,
) -> Tokenizer:
    assert len(pieces) == len(scores) == len(types), (len(pieces), len(scores), len(types))
    vocab = {piece: i for i, piece in enumerate(pieces)}
    if len(vocab) != len(pieces):
        raise ValueError(f"vocabulary has {len(pieces) - len(vocab)} duplicate pieces")
    bpe = models.BPE(
        vocab=vocab,
        merges=_spm_merges(pieces, scores, types),
        unk_token=pieces[unk_id] if unk_id is not None else None,
        fuse_unk=True,
        byte_fallback=byte_fallback,
    )
    tok = Tokenizer(bpe)
    replace = normalizers.Replace(" ", SPIECE_SPACE)
    prepend = [normalizers.Prepend(SPIECE_SPACE)] if add_prefix_space else []
    tok.normalizer = normalizers.Sequence(prepend + [replace])
    steps = [decoders.Replace(SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix_space:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(steps)
    # SentencePiece never produces control/unknown pieces from text; user-defined ones it matches whole.
    _add_vocab_tokens(tok, pieces, [types[i] in (UNKNOWN, CONTROL) for i in range(len(pieces))],
                      [types[i] == USER_DEFINED for i in range(len(pieces))])
    if add_bos:
        tok.post_processor = _bos_template(pieces, bos_id)
    return tok


def _spm_merges(pieces: Sequence[str], scores: Sequence[float], types: Sequence[int]) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece's: every split of a normal piece into two normal
    pieces, ranked by the merged piece's score (best first), then by piece id."""
    mergeable = {p: i for i, p in enumerate(pieces) if types[i] == NORMAL}
    merges: list[tuple[float, int, int, int, str, str]] = []
    for piece, i in mergeable.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                merges.append((-scores[i], i, mergeable[left], mergeable[right], left, right))
    merges.sort()
    return [(left, right) for *_, left, right in merges]


def _add_vocab_tokens(tok: Tokenizer, tokens: Sequence[str], special: Sequence[bool], plain: Sequence[bool]) -> None:
    """Mark vocabulary tokens as added tokens (matched whole, never split), keeping their ids."""
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t, s in zip(tokens, special) if s])
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t, p in zip(tokens, plain) if p])


def _bos_template(tokens: Sequence[str], bos_id: int | None) -> processors.TemplateProcessing:
    if bos_id is None:
        raise ValueError("the tokenizer adds BOS but names no BOS token id")
    bos = tokens[bos_id]
    return processors.TemplateProcessing(
        single=[bos, "$A:0"], pair=[bos, "$A:0", bos, "$B:1"], special_tokens=[(bos, bos_id)]
    )


def _read_spm_proto(model_path: Path) -> Any:
    try:
        from sentencepiece import sentencepiece_model_pb2  # optional extra (needs protobuf)
    except ImportError as e:
        raise ImportError("converting a tokenizer.model needs `sentencepiece` and `protobuf`") from e
    if not model_path.is_file():
        raise FileNotFoundError(f"no SentencePiece model at {model_path}")
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(model_path.read_bytes())
    except Exception as e:  # protobuf raises its own DecodeError
        raise ValueError(f"{model_path} is not a SentencePiece model: {e}") from e
    if not proto.pieces:
        raise ValueError(f"{model_path} is not a SentencePiece model: no pieces")
    return proto


def _optional_id(value: int, size: int) -> int | None:
    return value if 0 <= value < size else None


# ---------------------------------------------------------------------------------------------
# GGUF


def _read_gguf_tokenizer_metadata(path: Path) -> dict[str, Any]:
    try:
        import gguf  # optional extra
    except ImportError as e:
        raise ImportError("converting a GGUF tokenizer needs the `gguf` package") from e
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError/struct.error/... on a damaged file
        raise ValueError(f"{path} is not a readable GGUF file: {e}") from e
    return {name: field.contents() for name, field in reader.fields.items() if name.startswith("tokenizer.ggml.")}


def _required(meta: dict[str, Any], key: str, path: Path) -> Any:
    if key not in meta:
        raise ValueError(f"{path}: GGUF tokenizer metadata lacks {key}")
    return meta[key]


def _byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map (bytes_to_unicode)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _gguf_byte_level_tokenizer(meta: dict[str, Any], path: Path) -> Tokenizer:
    tokens = _required(meta, "tokenizer.ggml.tokens", path)
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    merges = [tuple(m.split(" ")) for m in _required(meta, "tokenizer.ggml.merges", path)]
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in SUPPORTED_GGUF_PRE:
        raise ValueError(f"{path}: unsupported tokenizer.ggml.pre = {pre!r} (supported: {SUPPORTED_GGUF_PRE})")
    # Tokens are stored spelled in the byte-level alphabet; one that is not (llama.cpp writes some
    # added tokens raw) is respelled, as transformers' GGUF loader does.
    spelling = _byte_level_alphabet()
    alphabet = set(spelling.values())
    spelled = [t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode()) for t in tokens]
    vocab = {t: i for i, t in enumerate(spelled)}
    if len(vocab) != len(spelled):
        raise ValueError(f"{path}: tokenizer.ggml.tokens has duplicate tokens")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, ignore_merges=pre in _LLAMA3_PRE))
    tok.pre_tokenizer = _gguf_pre_tokenizer(pre)
    tok.decoder = decoders.ByteLevel()
    # Control tokens become special; a "control" token outside the byte alphabet is a llama.cpp
    # mislabel and is left alone (as transformers does). User-defined tokens match whole.
    _add_vocab_tokens(tok, spelled, [types[i] == CONTROL and set(t) <= alphabet for i, t in enumerate(tokens)],
                      [types[i] == USER_DEFINED for i in range(len(tokens))])
    if meta.get("tokenizer.ggml.add_bos_token", False):
        tok.post_processor = _bos_template(spelled, meta.get("tokenizer.ggml.bos_token_id"))
    return tok


def _gguf_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if pre in _GPT2_PRE:
        return byte_level
    if pre in _SMOLLM_PRE:
        # llama.cpp: "\p{N}" then the GPT-2 regex; SmolLM's tokenizer.json: Digits + ByteLevel.
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    assert pre in _LLAMA3_PRE, pre
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
