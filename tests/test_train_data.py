"""Training data: conversation parsing with skip counts, the assistant-only loss mask, shards
(round trip, resume, corruption and width errors)."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from msd_engine import Engine
from msd_engine.train import data as train_data
from msd_engine.train.data import (MANIFEST_FILE, build_record, build_shards, conversation_ids, read_conversations,
                                   read_shards, write_shards)
from tests.factories import IMAGE_TOKEN_ID

LONG = "word " * 400


class Interrupted(Exception):
    pass


def make_dataset(root):
    """6 items: 2 usable text, 1 usable image, 1 missing image, 1 without answer, 1 over-long, 1 malformed,
    1 unreadable image."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), (200, 10, 10)).save(root / "img" / "red.png")
    (root / "img" / "bad.png").write_bytes(b"not a png")
    def conv(*pairs):
        return [{"from": r, "value": v} for p in pairs for r, v in zip(("human", "gpt"), p)]
    items = [
        {"id": "t1", "conversations": conv(("Hello there", "Hi, how are you?"), ("Fine.", "Good to hear"))},
        {"id": "v1", "image": "red.png", "conversations": conv(("<image>\nWhat colour is it?", "It is red."))},
        {"id": "miss", "image": "nope.png", "conversations": conv(("<image>\nWhat?", "Nothing."))},
        {"id": "noans", "conversations": [{"from": "human", "value": "Anyone?"}]},
        {"id": "long", "conversations": conv(("Tell me a story", LONG))},
        {"id": "t2", "conversations": conv(("Name a fruit", "An apple."))},
        {"id": "bad", "conversations": "oops"},
        {"id": "unread", "image": "bad.png", "conversations": conv(("<image>\nWhat?", "Noise."))},
    ]
    path = root / "data.json"
    path.write_text(json.dumps(items))
    return path


@pytest.fixture(scope="module")
def engine(tiny_llava_dir):
    return Engine.load(tiny_llava_dir, dtype="float32", max_seq_len=256)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return make_dataset(root), root / "img"


def test_read_conversations_counts_each_skip_reason(dataset):
    convs, skips = read_conversations(*dataset)
    assert [c.id for c in convs] == ["t1", "v1", "long", "t2"]
    assert skips.to_dict() == {"malformed": 1, "no_assistant_turn": 1, "missing_image": 1, "unreadable_image": 1,
                               "too_long": 0}
    assert convs[1].image is not None and convs[0].turns[1] == ("Fine.", "Good to hear")


def test_loss_mask_covers_exactly_the_answers(engine, dataset):
    convs, _ = read_conversations(*dataset)
    ids, mask = conversation_ids(engine, convs[0].turns, 0)
    tok = engine.tokenizer
    assert tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False) == \
        "Hi, how are you?</s> Good to hear</s>"
    assert ids[0] == tok.bos_id and mask[0] == 0
    assert tok.decode([i for i, m in zip(ids, mask) if not m]).strip() == "USER: Hello there ASSISTANT: USER: Fine. ASSISTANT:"
    # with an image: the expanded span is masked out, the answer is in
    ids, mask = conversation_ids(engine, convs[1].turns, 1)
    n_img = engine.config.vision.num_image_tokens
    span = [m for i, m in zip(ids, mask) if i == IMAGE_TOKEN_ID]
    assert len(span) == n_img and not any(span)
    assert tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False) == "It is red.</s>"


def test_build_record_aligns_with_the_record_convention(engine, dataset):
    convs, _ = read_conversations(*dataset)
    skips = train_data.SkipCounts()
    rec = build_record(engine, convs[1], max_len=200, skips=skips)
    ids, mask = conversation_ids(engine, convs[1].turns, 1)
    assert rec.is_visual and rec.features.shape == (len(ids), engine.config.text.hidden_size)
    assert rec.token_ids[:-1].tolist() == ids[1:]  # the EAGLE shift
    assert rec.loss_mask.tolist() == mask
    assert int(rec.is_image.sum()) == engine.config.vision.num_image_tokens
    assert build_record(engine, convs[2], max_len=200, skips=skips) is None and skips.too_long == 1


@pytest.fixture(scope="module")
def records(engine, dataset):
    convs, _ = read_conversations(*dataset)
    return [build_record(engine, c, 200) for c in (convs[0], convs[1], convs[3])]


def _same(a, b):
    assert a.is_visual == b.is_visual
    for k in ("token_ids", "features", "loss_mask", "image_rows", "is_image"):
        x, y = getattr(a, k), getattr(b, k)
        assert (x is None and y is None) or torch.equal(x, y), k


def test_shard_round_trip(records, tmp_path):
    paths = write_shards(records, tmp_path / "s", records_per_shard=2)
    assert [p.name for p in paths] == ["shard-00000.safetensors", "shard-00001.safetensors"]
    back = read_shards(tmp_path / "s", hidden_size=records[0].features.shape[1])
    assert len(back) == 3
    for a, b in zip(records, back):
        _same(a, b)


def test_shard_errors_name_the_file(records, tmp_path):
    write_shards(records, tmp_path / "s", records_per_shard=2)
    with pytest.raises(ValueError, match="hidden size is 99"):
        read_shards(tmp_path / "s", hidden_size=99)
    last = tmp_path / "s" / "shard-00001.safetensors"
    last.write_bytes(last.read_bytes()[:40])
    with pytest.raises(ValueError, match="shard-00001.safetensors: corrupt"):
        read_shards(tmp_path / "s")
    last.unlink()
    with pytest.raises(FileNotFoundError, match="shard-00001.safetensors"):
        read_shards(tmp_path / "s")


def test_build_shards_resumes_after_an_interruption(engine, dataset, tmp_path, monkeypatch):
    convs, _ = read_conversations(*dataset)  # t1, v1, long (skipped), t2
    out = tmp_path / "run"
    calls, interrupt = [], [True]
    real = train_data.build_record

    def counting(engine, conv, *a, **kw):
        calls.append(conv.id)
        if conv.id == "t2" and interrupt[0]:
            raise Interrupted  # the first run dies on the last conversation
        return real(engine, conv, *a, **kw)

    monkeypatch.setattr(train_data, "build_record", counting)
    with pytest.raises(Interrupted):
        build_shards(engine, convs, out, max_len=200, records_per_shard=2)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert [s["file"] for s in manifest["shards"]] == ["shard-00000.safetensors"] and not manifest["complete"]
    calls.clear()
    interrupt[0] = False
    writer = build_shards(engine, convs, out, max_len=200, records_per_shard=2)
    assert calls == ["long", "t2"]  # only what the completed shard did not cover
    assert writer.skips.too_long == 1
    back = read_shards(out)
    assert len(back) == 3 and json.loads((out / MANIFEST_FILE).read_text())["complete"]
    # deleting a shard listed in the manifest: a resume names it
    (out / "shard-00001.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="shard-00001.safetensors"):
        build_shards(engine, convs, out, max_len=200, records_per_shard=2)
