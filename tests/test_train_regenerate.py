"""`train-data --regenerate`: every recorded answer is exactly the target's own generation (greedy, or
sampled with the answer's seed) for the recorded prefix before it (in token space: no decode / re-encode
round trip); with --draft, speculative decoding writes the same answers."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from msd_engine import Engine
from msd_engine.cli import main
from msd_engine.request import pixel_values_for
from msd_engine.train.data import build_record, read_conversations, read_shards, template_ids
from msd_engine.train.regenerate import answer_seed
from tests.test_train_data import make_dataset

MAX_NEW = 8


def _target_ids(record) -> list[int]:
    """The target's input ids of a record: BOS, then token_ids without the recorded next token."""
    return [1] + record.token_ids[:-1].tolist()


def _answer_spans(mask: list[float]) -> list[tuple[int, int]]:
    spans, start = [], None
    for j, m in enumerate(mask + [0]):
        if m and start is None:
            start = j
        elif not m and start is not None:
            spans.append((start, j))
            start = None
    return spans


def _check_answers_are_greedy(engine, record, pixels, last_closed: bool, temperature: float = 0.0,
                              seeds=()) -> list[list[int]]:
    """Each answer span equals plain engine.generate on the ids before it (sampled with seeds[k] when
    temperature > 0; a cut answer that another turn follows is closed by the template's </s>); returns
    the generations."""
    ids = _target_ids(record)
    spans = _answer_spans(record.loss_mask.tolist())
    generated = []
    for k, (a, b) in enumerate(spans):
        gen = engine.generate(input_ids=ids[:a], pixel_values=pixels, max_new_tokens=MAX_NEW, speculative=False,
                              temperature=temperature, seed=seeds[k] if temperature else None)
        generated.append(gen.token_ids)
        closing = [2] if gen.finish_reason == "length" and (k < len(spans) - 1 or last_closed) else []
        assert ids[a:b] == gen.token_ids + closing, (k, gen.finish_reason)
    return generated


@pytest.fixture(scope="module")
def engine(tiny_llava_dir):
    return Engine.load(tiny_llava_dir, dtype="float32", max_seq_len=256)


def test_train_data_regenerate_records_the_targets_greedy_answers(tiny_llava_dir, engine, tmp_path, capsys):
    data = make_dataset(tmp_path)
    shards = tmp_path / "shards"
    assert main(["train-data", "--model", str(tiny_llava_dir), "--data", str(data), "--images", str(tmp_path / "img"),
                 "--out", str(shards), "--max-len", "200", "--regenerate", "--max-new-tokens", str(MAX_NEW)]) == 0
    assert "4 records in 1 shard(s)" in capsys.readouterr().out  # "long" is short once its answer is regenerated
    records = read_shards(shards)
    convs = [c for c in read_conversations(data, tmp_path / "img")[0]]
    assert [c.id for c in convs] == ["t1", "v1", "long", "t2"]
    for conv, record in zip(convs, records):
        pixels = pixel_values_for(engine.config, [conv.image] if conv.image else [])
        assert record.is_visual == (conv.image is not None)
        generated = _check_answers_are_greedy(engine, record, pixels, last_closed=False)
        assert len(generated) == len(conv.turns)
        # the first prompt is the template's, as without --regenerate
        first = template_ids(engine, [(conv.turns[0][0], None)], 1 if conv.image else 0)
        a = _answer_spans(record.loss_mask.tolist())[0][0]
        ids = _target_ids(record)
        assert ids[:a].count(engine.config.image_token_id) == (engine.config.vision.num_image_tokens if conv.image
                                                              else 0)
        assert [t for t in ids[:a] if t != engine.config.image_token_id] == \
            [t for t in first if t != engine.config.image_token_id]


def test_an_answer_ending_with_eos_is_kept_as_generated(engine, tmp_path):
    """With EOS reached (made reachable by declaring a token the target emits an EOS id), the answer ends
    with that EOS and the next turn follows it directly (vicuna_v1 puts nothing after the </s>)."""
    convs, _ = read_conversations(make_dataset(tmp_path), tmp_path / "img")
    t1 = convs[0]
    first = engine.generate(input_ids=template_ids(engine, [(t1.turns[0][0], None)], 0), max_new_tokens=MAX_NEW,
                            speculative=False).token_ids
    stopping = dataclasses.replace(engine.config, eos_token_ids=(2, first[3]))
    saved, engine.config = engine.config, stopping
    try:
        record = build_record(engine, t1, 200, regenerate=True, max_new_tokens=MAX_NEW)
        generated = _check_answers_are_greedy(engine, record, None, last_closed=False)
    finally:
        engine.config = saved
    assert generated[0] == first[:4]  # stopped at the declared EOS, which the record keeps
    spans = _answer_spans(record.loss_mask.tolist())
    ids = _target_ids(record)
    assert ids[spans[0][0]:spans[0][1]] == first[:4]
    assert ids[spans[0][1]] != 2  # no extra </s>: the next question starts right after the EOS
    assert torch.equal(record.loss_mask[spans[0][0]:spans[0][1]], torch.ones(4))


def _record(tiny_llava_dir, tmp_path, name: str, *flags: str):
    data = make_dataset(tmp_path)
    assert main(["train-data", "--model", str(tiny_llava_dir), "--data", str(data), "--images", str(tmp_path / "img"),
                 "--out", str(tmp_path / name), "--max-len", "200", "--regenerate", "--max-new-tokens", str(MAX_NEW),
                 *flags]) == 0
    return read_conversations(data, tmp_path / "img")[0], read_shards(tmp_path / name)


def test_sampled_answers_follow_their_seeds_and_differ_from_greedy(tiny_llava_dir, engine, tmp_path):
    convs, sampled = _record(tiny_llava_dir, tmp_path, "t1", "--temperature", "1.0", "--seed", "5")
    _, greedy = _record(tiny_llava_dir, tmp_path, "t0")
    _, other_seed = _record(tiny_llava_dir, tmp_path, "t1s6", "--temperature", "1.0", "--seed", "6")
    assert len(sampled) == len(greedy) == 4
    for conv, record in zip(convs, sampled):
        pixels = pixel_values_for(engine.config, [conv.image] if conv.image else [])
        seeds = [answer_seed(5, conv.id, k) for k in range(len(conv.turns))]
        _check_answers_are_greedy(engine, record, pixels, last_closed=False, temperature=1.0, seeds=seeds)
    # a random tiny model at T=1 all but never repeats its greedy answer, nor another seed's sample
    assert all(not torch.equal(a.token_ids, b.token_ids) for a, b in zip(sampled, greedy))
    assert any(not torch.equal(a.token_ids, b.token_ids) for a, b in zip(sampled, other_seed))


def test_draft_writes_the_same_greedy_answers(tiny_llava_dir, tmp_path):
    from tests.spec_doubles import write_random_draft

    draft = write_random_draft(Engine.load(tiny_llava_dir, dtype="float32"), tmp_path / "draft")
    _, plain = _record(tiny_llava_dir, tmp_path, "plain")
    _, spec = _record(tiny_llava_dir, tmp_path, "spec", "--draft", str(draft))
    assert len(plain) == len(spec) == 4
    for a, b in zip(plain, spec):
        assert torch.equal(a.token_ids, b.token_ids) and torch.equal(a.loss_mask, b.loss_mask)
        torch.testing.assert_close(a.features, b.features, rtol=0, atol=0)


@pytest.mark.parametrize("flags, message", [(["--temperature", "0.5"], "need --regenerate"),
                                            (["--regenerate", "--temperature", "-1"], "--temperature must be >= 0")])
def test_sampling_flags_are_checked(tiny_llava_dir, tmp_path, flags, message, capsys):
    data = make_dataset(tmp_path)
    code = main(["train-data", "--model", str(tiny_llava_dir), "--data", str(data), "--out", str(tmp_path / "o"),
                 *flags])
    assert code != 0 and message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
