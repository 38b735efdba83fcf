"""`train-data --regenerate --batch-size N`: answers written by transformers' batched generate on the
target's weights are the target's greedy answers, and the features captured on the way are the
target's, record for record what the engine's batch-1 recording gives (one token shorter: the
batched record ends before the answer's last token, which it keeps as the record's next token)."""
from __future__ import annotations

import pytest
import torch

from msd_engine import Engine
from msd_engine.cli import main
from msd_engine.train.data import build_record, read_conversations, read_manifest, read_shards
from tests.test_train_data import make_dataset

MAX_NEW = 8
# transformers and the engine sum in different orders in float32: features of this O(1)-scaled tiny
# model agree to a few ulps times the depth; 1e-4 is far below any difference a wrong position,
# row or mask would make (those are O(1))
ATOL = RTOL = 1e-4


@pytest.fixture(scope="module")
def engine(tiny_llava_dir):
    return Engine.load(tiny_llava_dir, dtype="float32", max_seq_len=256)


def _record(tiny_llava_dir, root, name: str, batch: int, *flags: str) -> int:
    """The CLI's exit code (later flags win, e.g. a second --shard-size)."""
    return main(["train-data", "--model", str(tiny_llava_dir), "--data", str(root / "data.json"),
                 "--images", str(root / "img"), "--out", str(root / name), "--max-len", "200", "--regenerate",
                 "--max-new-tokens", str(MAX_NEW), "--batch-size", str(batch), "--shard-size", "2", *flags])


def test_batched_records_match_the_engines_batch1_records(tiny_llava_dir, engine, tmp_path, capsys):
    make_dataset(tmp_path)
    assert _record(tiny_llava_dir, tmp_path, "batched", 3) == 0
    out = capsys.readouterr().out
    convs, _ = read_conversations(tmp_path / "data.json", tmp_path / "img")
    records = read_shards(tmp_path / "batched")
    single = [c for c in convs if len(c.turns) == 1]
    assert [c.id for c in convs if len(c.turns) > 1] == ["t1"]  # batched recording skips it, counted
    assert "malformed 2" in out  # the dataset's own malformed item + the two-turn one
    assert len(records) == len(single) == 3 and sum(r.is_visual for r in records) == 1
    for conv, record in zip(single, records):
        ref = build_record(engine, conv, 200, regenerate=True, max_new_tokens=MAX_NEW)
        n = record.token_ids.shape[0]
        assert ref.token_ids.shape[0] >= n + 1  # the reference also holds the answer's last token
        assert torch.equal(record.token_ids, ref.token_ids[:n])
        assert torch.equal(record.loss_mask, ref.loss_mask[:n]) and record.loss_mask.sum() >= 1
        torch.testing.assert_close(record.features, ref.features[:n], atol=ATOL, rtol=RTOL)
        assert record.is_visual == ref.is_visual
        if record.is_visual:
            assert torch.equal(record.is_image, ref.is_image[:n])
            torch.testing.assert_close(record.image_rows[record.is_image], ref.image_rows[:n][ref.is_image[:n]],
                                       atol=ATOL, rtol=RTOL)


def test_batch_size_does_not_change_the_records(tiny_llava_dir, tmp_path):
    make_dataset(tmp_path)
    assert _record(tiny_llava_dir, tmp_path, "b1", 1) == 0
    assert _record(tiny_llava_dir, tmp_path, "b4", 4) == 0
    for a, b in zip(read_shards(tmp_path / "b1"), read_shards(tmp_path / "b4"), strict=True):
        assert torch.equal(a.token_ids, b.token_ids) and torch.equal(a.loss_mask, b.loss_mask)
        torch.testing.assert_close(a.features, b.features, atol=ATOL, rtol=RTOL)
    assert read_manifest(tmp_path / "b4")["complete"]


def test_an_interrupted_batched_run_resumes_after_its_last_shard(tiny_llava_dir, tmp_path, monkeypatch):
    """Batches of 2, one record per shard: a failure in the second batch keeps the first batch's
    shard; the rerun generates only what is missing and ends with what an uninterrupted run records."""
    from msd_engine.train import batched

    make_dataset(tmp_path)
    assert _record(tiny_llava_dir, tmp_path, "whole", 2, "--shard-size", "1") == 0
    generate, calls = batched._generate_group, []

    def failing_second(engine, hf_model, group, skips):
        calls.append([p.conversation.id for p in group])
        if len(calls) == 2:
            raise RuntimeError("interrupted")
        yield from generate(engine, hf_model, group, skips)

    monkeypatch.setattr(batched, "_generate_group", failing_second)
    assert _record(tiny_llava_dir, tmp_path, "resumed", 2, "--shard-size", "1") != 0  # the CLI reports the error
    assert len(calls) == 2
    assert read_manifest(tmp_path / "resumed")["position"] == 2 and not read_manifest(tmp_path / "resumed")["complete"]
    calls.clear()
    assert _record(tiny_llava_dir, tmp_path, "resumed", 2, "--shard-size", "1") == 0
    assert calls == [["long", "t2"]]  # the first batch (t1 skipped, v1) is not generated again
    whole, resumed = read_manifest(tmp_path / "whole"), read_manifest(tmp_path / "resumed")
    assert resumed["complete"] and resumed["skips"] == whole["skips"]
    for a, b in zip(read_shards(tmp_path / "whole"), read_shards(tmp_path / "resumed"), strict=True):
        assert torch.equal(a.token_ids, b.token_ids) and torch.equal(a.loss_mask, b.loss_mask)


@pytest.mark.parametrize("flags, message", [
    (["--batch-size", "2"], "need --regenerate"),
    (["--regenerate", "--batch-size", "2", "--temperature", "0.7"], "takes no --temperature"),
    (["--regenerate", "--batch-size", "-1"], "--batch-size must be >= 0"),
])
def test_batched_flags_are_checked(tiny_llava_dir, tmp_path, flags, message, capsys):
    data = make_dataset(tmp_path)
    code = main(["train-data", "--model", str(tiny_llava_dir), "--data", str(data), "--out", str(tmp_path / "o"),
                 *flags])
    assert code != 0 and message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
