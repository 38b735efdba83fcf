"""Tokenizer conversion, runtime encode/decode, streaming, and LLaVA prompt formatting.

References nobody here wrote:
- SentencePiece itself, through transformers' slow `SentencePieceBackend(legacy=True)`: this is
  what the original LLaVA runs (`use_fast=False`), and what llava-hf's legacy tokenizer.json
  reproduces. (transformers 5.x no longer reproduces it from a tokenizer.model: its
  `LlamaConverter` fails on BPE models, and `LlamaTokenizer.from_pretrained` uses `Metaspace`
  and id-ranked merges, which tokenise " USER" and "a  b" differently from SentencePiece.)
- transformers' GGUF tokenizer loader for the SmolLM2 GGUF.
- LLaVA's `tokenizer_image_token`, transcribed below.
"""
from __future__ import annotations

import random
from pathlib import Path

import pytest

from msd_engine.convert.tokenizer_files import (
    ensure_added_token,
    tokenizer_json_from_gguf,
    tokenizer_json_from_sentencepiece,
)
from msd_engine.tokenizer import (
    PromptError,
    StreamDecoder,
    Tokenizer,
    encode_prompt,
    format_conversation,
    format_prompt,
)
from tests.factories import SMOLLM2_GGUF, SP_TOKENIZER

IMAGE = "<image>"
IMAGE_ID = 32000

STRINGS = [
    "",
    " ",
    "Hello world",
    "  two leading spaces",
    "trailing spaces   ",
    "multiple   spaces\tand\ttabs",
    "new\nlines\n\n and blank\n",
    "\nstarts with a newline",
    "digits 1234567890, 3.14159 and 2024-01-01",
    "unicode: café naïve Ωμέγα Ünïcödé",
    "emoji 😀🚀 👍🏽 family 👨‍👩‍👧",
    "CJK 你好，世界。日本語のテキスト 한국어",
    "Arabic العربية and Hebrew עברית",
    "<image>\nWhat is in the image?",
    " USER: <image>\nDescribe it. ASSISTANT:",
    "an answer</s>USER: next",
    "code: def f(x):\n    return x ** 2  # comment",
]
STREAM_STRINGS = [
    "Hello world, this is streaming.",
    "emoji 😀🚀 and 👍🏽 mixed with text",
    "你好，世界。日本語のテキストです。",
    "😀😀 start and end 🚀",
    "  spaced   out\nlines ",
]
CHATML_STRINGS = [
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|endoftext|>",
]


# ---------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def sp_json() -> str:
    return tokenizer_json_from_sentencepiece(SP_TOKENIZER)


@pytest.fixture(scope="module")
def sp_tok(sp_json) -> Tokenizer:
    return Tokenizer.from_str(sp_json)


@pytest.fixture(scope="module")
def llava_tok(sp_json) -> Tokenizer:
    """The llava-hf layout: <image> is a special added token with id 32000."""
    return Tokenizer.from_str(ensure_added_token(sp_json, IMAGE, IMAGE_ID))


@pytest.fixture(scope="module")
def slow_ref():
    """transformers' slow SentencePiece tokenizer (legacy, as LLaVA's `use_fast=False`)."""
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    return SentencePieceBackend(vocab_file=str(SP_TOKENIZER), legacy=True, bos_token="<s>", eos_token="</s>",
                                unk_token="<unk>")


@pytest.fixture(scope="module")
def sp_model():
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(SP_TOKENIZER))


@pytest.fixture(scope="module")
def gguf_tok() -> Tokenizer:
    return Tokenizer.from_str(tokenizer_json_from_gguf(SMOLLM2_GGUF))


@pytest.fixture(scope="module")
def gguf_ref():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(SMOLLM2_GGUF.parent), gguf_file=SMOLLM2_GGUF.name)


def _slow_ids(slow_ref, text: str) -> list[int]:
    return slow_ref.encode(text, add_special_tokens=False)


# ---------------------------------------------------------------------------------------------
# SentencePiece conversion


@pytest.mark.parametrize("text", STRINGS)
def test_sentencepiece_matches_slow_tokenizer(sp_tok, slow_ref, sp_model, text):
    ids = sp_tok.encode(text, add_bos=False)
    assert ids == _slow_ids(slow_ref, text)
    assert sp_tok.encode(text, add_bos=True) == [1] + ids
    assert sp_tok.decode(ids) == sp_model.decode(ids)
    if "</s>" not in text:
        assert ids == sp_model.encode(text)
        assert sp_tok.decode(ids) == text


def test_sentencepiece_structure(sp_tok, sp_json):
    assert sp_tok.vocab_size == 32000
    assert sp_tok.bos_id == 1 and sp_tok.adds_bos
    assert sp_tok.token_to_id("</s>") == 2 and sp_tok.token_to_id("<image>") is None
    assert len(sp_tok.byte_token_ids) == 256
    # Whitespace pieces rank by score (-1e9), not by their low id: "a  b" keeps "▁" + "▁b".
    assert sp_tok.encode("hello  world", add_bos=False) == [6312, 28709, 28705, 1526]
    assert '"Prepend"' in sp_json and '"Metaspace"' not in sp_json


def test_sentencepiece_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.model"):
        tokenizer_json_from_sentencepiece(tmp_path / "missing.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"\xff\x00 definitely not a protobuf")
    with pytest.raises(ValueError, match="bad.model"):
        tokenizer_json_from_sentencepiece(bad)


# ---------------------------------------------------------------------------------------------
# GGUF conversion


@pytest.mark.parametrize("text", STRINGS + CHATML_STRINGS)
def test_gguf_matches_transformers(gguf_tok, gguf_ref, text):
    ids = gguf_tok.encode(text, add_bos=False)
    assert ids == gguf_ref.encode(text, add_special_tokens=False)
    assert gguf_tok.decode(ids) == gguf_ref.decode(ids, skip_special_tokens=True)
    assert gguf_tok.decode(ids, skip_special_tokens=False) == gguf_ref.decode(ids, skip_special_tokens=False)


def test_gguf_structure(gguf_tok, gguf_ref):
    assert gguf_tok.vocab_size == len(gguf_ref) == 49152
    assert gguf_tok.bos_id is None and not gguf_tok.adds_bos  # tokenizer.ggml.add_bos_token = False
    assert [gguf_tok.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [0, 1, 2]
    assert gguf_tok.decode([1, 2, 0]) == ""  # control tokens are special
    with pytest.raises(ValueError, match="no BOS"):
        gguf_tok.encode("hi", add_bos=True)


def _write_gguf(path: Path, model: str, tokens, types, *, scores=None, merges=None, pre=None, **ids) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model(model)
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if scores is not None:
        writer.add_token_scores(scores)
    if merges is not None:
        writer.add_token_merges(merges)
    for name, value in ids.items():
        getattr(writer, f"add_{name}")(value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_llama_vocab_matches_sentencepiece(tmp_path, sp_tok):
    """A SentencePiece vocabulary stored in GGUF ("llama") tokenises like the tokenizer.model."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(SP_TOKENIZER.read_bytes())
    path = _write_gguf(tmp_path / "spm.gguf", "llama", [p.piece for p in proto.pieces],
                       [p.type for p in proto.pieces], scores=[p.score for p in proto.pieces],
                       bos_token_id=1, eos_token_id=2, unk_token_id=0)
    tok = Tokenizer.from_str(tokenizer_json_from_gguf(path))
    assert tok.bos_id == 1 and tok.vocab_size == sp_tok.vocab_size
    for text in STRINGS:
        ids = tok.encode(text, add_bos=True)
        assert ids == sp_tok.encode(text, add_bos=True), text
        assert tok.decode(ids) == sp_tok.decode(ids)


def test_gguf_llama_bpe_pre_tokenizer(tmp_path):
    import tokenizers

    alphabet = [chr(c) for c in range(ord("!"), ord("~") + 1)] + ["Ġ", "xy"]
    path = _write_gguf(tmp_path / "l3.gguf", "gpt2", alphabet, [1] * len(alphabet), merges=["x y"], pre="llama-bpe")
    backend = tokenizers.Tokenizer.from_str(tokenizer_json_from_gguf(path))
    assert [p for p, _ in backend.pre_tokenizer.pre_tokenize_str("x 12345")] == ["x", "Ġ", "123", "45"]


def test_gguf_unsupported(tmp_path):
    path = _write_gguf(tmp_path / "t5.gguf", "t5", ["a", "b"], [1, 1], scores=[0.0, 0.0])
    with pytest.raises(ValueError, match=r"tokenizer\.ggml\.model = 't5'"):
        tokenizer_json_from_gguf(path)
    path = _write_gguf(tmp_path / "pre.gguf", "gpt2", ["a", "b", "ab"], [1, 1, 1], merges=["a b"], pre="made-up")
    with pytest.raises(ValueError, match=r"tokenizer\.ggml\.pre = 'made-up'"):
        tokenizer_json_from_gguf(path)
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        tokenizer_json_from_gguf(tmp_path / "nope.gguf")


# ---------------------------------------------------------------------------------------------
# runtime loading and decoding


def test_from_file(tmp_path, sp_json):
    good = tmp_path / "tokenizer.json"
    good.write_text(sp_json, encoding="utf-8")
    tok = Tokenizer.from_file(good)
    assert tok.bos_id == 1 and tok.encode("Hi", add_bos=True) == [1, 15359]
    assert Tokenizer.from_file(good, bos_id=2).bos_id == 2
    with pytest.raises(FileNotFoundError, match="absent.json"):
        Tokenizer.from_file(tmp_path / "absent.json")
    for name, text in (("broken.json", "{not json"), ("wrong.json", '{"model": 3}')):
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=name):
            Tokenizer.from_file(tmp_path / name)


def test_decode_ids_outside_vocab(sp_tok):
    hello = sp_tok.encode("Hello", add_bos=False)
    assert sp_tok.decode(hello + [32050]) == "Hello"  # a model's padded embedding rows have no text
    with pytest.raises(ValueError, match="-200"):
        sp_tok.decode([-200])


# ---------------------------------------------------------------------------------------------
# streaming


def _stream(tok: Tokenizer, ids: list[int]) -> list[str]:
    decoder = StreamDecoder(tok)
    pieces = [decoder.push(i) for i in ids]
    return pieces + [decoder.flush()]


@pytest.mark.parametrize("which", ["sp_tok", "gguf_tok"])
@pytest.mark.parametrize("text", STREAM_STRINGS)
def test_stream_decoder_text(request, which, text):
    tok = request.getfixturevalue(which)
    ids = tok.encode(text, add_bos=False)
    pieces = _stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)  # never half a character


def test_stream_decoder_keeps_leading_spaces(sp_tok):
    ids = sp_tok.encode("Hello big world", add_bos=True)
    assert [p for p in _stream(sp_tok, ids) if p] == ["Hello", " big", " world"]


@pytest.mark.parametrize("which", ["sp_tok", "gguf_tok"])
def test_stream_decoder_random_ids(request, which):
    """Any id sequence, including broken UTF-8 and cut-off characters, streams to `decode`."""
    tok = request.getfixturevalue(which)
    rng = random.Random(0)
    emoji = tok.encode("😀你", add_bos=False)
    for _ in range(200):
        ids = []
        for _ in range(rng.randint(1, 12)):
            kind = rng.random()
            if kind < 0.3:
                ids.extend(emoji[: rng.randint(1, len(emoji))])
            elif kind < 0.5 and tok.byte_token_ids:
                ids.append(rng.choice(sorted(tok.byte_token_ids)))
            else:
                ids.append(rng.randrange(tok.vocab_size))
        assert "".join(_stream(tok, ids)) == tok.decode(ids), ids


# ---------------------------------------------------------------------------------------------
# prompt formatting


def test_format_vicuna():
    assert format_prompt("vicuna_v1", "What is this?", 1) == " USER: <image>\nWhat is this? ASSISTANT:"
    assert format_prompt("vicuna_v1", "<image>\nWhat is this?", 1) == " USER: <image>\nWhat is this? ASSISTANT:"
    two = "Compare <image> and <image>."
    assert format_prompt("vicuna_v1", two, 2) == f" USER: {two} ASSISTANT:"
    assert format_prompt("vicuna_v1", "Two?", 2) == " USER: <image>\n<image>\nTwo? ASSISTANT:"
    assert format_prompt("vicuna_v1", "Hi there", 0) == " USER: Hi there ASSISTANT:"


def test_format_multi_turn():
    turns = [("Describe.", "A cat."), ("What colour?", None)]
    assert format_conversation("vicuna_v1", turns, 1) == (
        " USER: <image>\nDescribe. ASSISTANT: A cat.</s>USER: What colour? ASSISTANT:")
    assert format_conversation("chatml", turns, 0) == (
        "<|im_start|>user\nDescribe.<|im_end|>\n<|im_start|>assistant\nA cat.<|im_end|>\n"
        "<|im_start|>user\nWhat colour?<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(PromptError, match="only the last turn"):
        format_conversation("vicuna_v1", [("a", None), ("b", None)], 0)
    with pytest.raises(PromptError, match="plain"):
        format_conversation("plain", turns, 0)


def test_format_chatml_and_plain():
    assert format_prompt("chatml", "Hi", 0) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert format_prompt("chatml", "Hi", 1) == "<|im_start|>user\n<image>\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert format_prompt("plain", "Hi", 0) == "Hi"
    assert format_prompt("plain", "Hi", 1) == "<image>\nHi"
    assert format_prompt("plain", "Hi <img>", 1, image_token="<img>") == "Hi <img>"


@pytest.mark.parametrize("question,num_images,message", [
    ("<image>\n<image>\nq", 1, "prompt has 2 <image> tags but 1 image was given"),
    ("<image>\nq", 0, "prompt has 1 <image> tag but 0 images were given"),
    ("<image>\nq", 2, "prompt has 1 <image> tag but 2 images were given"),
])
def test_format_image_tag_count_errors(question, num_images, message):
    with pytest.raises(PromptError) as info:
        format_prompt("vicuna_v1", question, num_images)
    assert str(info.value) == message


def test_format_unknown_template():
    with pytest.raises(ValueError, match="unknown prompt template 'llama_2'"):
        format_prompt("llama_2", "q", 0)


# ---------------------------------------------------------------------------------------------
# prompt encoding


def llava_tokenizer_image_token(prompt, tokenizer, image_token_index):
    """LLaVA's llava/mm_utils.py::tokenizer_image_token, verbatim but for the tensor return."""
    prompt_chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]

    def insert_separator(X, sep):
        return [ele for sublist in zip(X, [sep] * len(X)) for ele in sublist][:-1]

    input_ids = []
    offset = 0
    if len(prompt_chunks) > 0 and len(prompt_chunks[0]) > 0 and prompt_chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        input_ids.append(prompt_chunks[0][0])

    for x in insert_separator(prompt_chunks, [image_token_index] * (offset + 1)):
        input_ids.extend(x[offset:])
    return input_ids


class _LlavaSlowTokenizer:
    """LLaVA's Llama tokenizer as `tokenizer_image_token` sees it: BOS + slow SentencePiece ids."""

    bos_token_id = 1

    def __init__(self, slow_ref):
        self.slow_ref = slow_ref

    def __call__(self, text):
        class _Out:
            input_ids = [1] + _slow_ids(self.slow_ref, text)
        return _Out()


def test_encode_prompt_hand_computed(llava_tok, sp_tok):
    prompt = format_prompt("vicuna_v1", "What is in the image?", 1)
    expected = [
        1,  # <s>
        28705, 2223, 725, 28747, 28705,  # "▁" "▁US" "ER" ":" "▁"  (the leading " " gets its own "▁")
        IMAGE_ID,
        28705, 13,  # "▁" "<0x0A>": the chunk after the image gets SentencePiece's dummy prefix
        3195, 349, 297, 272, 3469, 28804,  # "What" "▁is" "▁in" "▁the" "▁image" "?"
        8602, 8048, 12738, 28747,  # "▁ASS" "IST" "ANT" ":"
    ]
    assert encode_prompt(llava_tok, prompt, IMAGE, IMAGE_ID) == expected
    # The original release's tokenizer has no <image> token; the result is the same.
    assert encode_prompt(sp_tok, prompt, IMAGE, IMAGE_ID) == expected


@pytest.mark.parametrize("prompt", [
    format_prompt("vicuna_v1", "What is in the image?", 1),
    format_prompt("vicuna_v1", "Compare them.", 2),
    format_prompt("vicuna_v1", "No image here, just text 😀.", 0),
    format_conversation("vicuna_v1", [("Describe.", "A cat on a mat."), ("Colour?", None)], 1),
    "<image>",
    "text then image <image>",
])
def test_encode_prompt_matches_llava(llava_tok, slow_ref, prompt):
    expected = llava_tokenizer_image_token(prompt, _LlavaSlowTokenizer(slow_ref), IMAGE_ID)
    assert encode_prompt(llava_tok, prompt, IMAGE, IMAGE_ID) == expected


def test_encode_prompt_chatml(gguf_tok, gguf_ref):
    text = format_prompt("chatml", "What is 2+2?", 0)
    assert encode_prompt(gguf_tok, text, IMAGE, None) == gguf_ref(text).input_ids  # no BOS for SmolLM2
    ids = encode_prompt(gguf_tok, format_prompt("chatml", "Look", 1), IMAGE, 49152)
    assert ids.count(49152) == 1 and ids[:3] == gguf_ref.encode("<|im_start|>user\n", add_special_tokens=False)
    with pytest.raises(PromptError, match="no image token id"):
        encode_prompt(gguf_tok, "<image>\nq", IMAGE, None)


def test_encode_prompt_image_id_mismatch(llava_tok):
    with pytest.raises(ValueError, match="id 32000 in the tokenizer, not 31999"):
        encode_prompt(llava_tok, "<image>\nq", IMAGE, 31999)


# ---------------------------------------------------------------------------------------------
# ensure_added_token


def test_ensure_added_token(sp_json):
    added = ensure_added_token(sp_json, IMAGE, 32000)
    tok = Tokenizer.from_str(added)
    assert tok.vocab_size == 32001 and tok.token_to_id(IMAGE) == 32000
    assert 32000 in tok.encode("a <image>\nb", add_bos=False)
    # Special, so skipped in decode; the text after it got its own "▁", as in the slow tokenizer.
    assert tok.decode(tok.encode("a <image>\nb", add_bos=False)) == "a  \nb"
    assert ensure_added_token(added, IMAGE, 32000) == added  # idempotent
    # An existing vocabulary token keeps its id.
    assert Tokenizer.from_str(ensure_added_token(sp_json, "</s>", 2)).vocab_size == 32000


@pytest.mark.parametrize("token,token_id,message", [
    (IMAGE, 32001, "already has id 32000, not the requested id 32001"),
    ("<pad>", 32005, "next free id is 32001"),
    ("<pad>", 5, "that id is '<0x02>'"),
    ("</s>", 7, "already has id 2, not the requested id 7"),
])
def test_ensure_added_token_errors(sp_json, token, token_id, message):
    added = ensure_added_token(sp_json, IMAGE, 32000)
    with pytest.raises(ValueError, match=message):
        ensure_added_token(added, token, token_id)
