"""The reduced draft vocabulary: which tokens are counted (the loss's alignment), the reduced
cross-entropy against a plainly written reference, the `draft_vocab` buffer, and the round trip
training checkpoint -> convert msd-draft -> DraftConfig + int64 tensor."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from msd_engine import Engine
from msd_engine.convert.msd_draft import convert_msd_draft
from msd_engine.draft.config import DraftConfig
from msd_engine.draft.weights import DRAFT_VOCAB_KEY, draft_expected_shapes, load_draft_weights
from msd_engine.train.losses import CE_WEIGHT, draft_loss
from msd_engine.train.module import DraftModule
from msd_engine.train.records import DraftRecord, record_from_target
from msd_engine.train.trainer import train_draft
from msd_engine.train.vocab import count_targets, draft_targets, frequent_tokens

CONFIG = DraftConfig(hidden_size=16, intermediate_size=24, num_heads=2, num_kv_heads=2, vocab_size=40,
                     dtype="float32")


def _record(tokens, mask) -> DraftRecord:
    n = len(tokens)
    return DraftRecord(torch.tensor(tokens), torch.zeros(n, 4), torch.tensor(mask, dtype=torch.float32))


def test_frequent_tokens_counts_the_next_token_targets():
    # prediction i is weighted by mask[i+1] and targets the token at target position i+2 = token_ids[i+1]:
    # counted are token_ids[j] for j >= 1 with mask[j] = 1 (never token_ids[0], even under a mask)
    a = _record([9, 7, 7, 3, 9, 7, 5], [1, 0, 1, 1, 1, 0, 1])   # counts 7, 3, 9, 5
    b = _record([4, 3, 3, 8], [0, 1, 1, 0])                       # counts 3, 3
    assert draft_targets(a.token_ids, a.loss_mask).tolist() == [7, 3, 9, 5]
    counts = count_targets([a, b], vocab_size=12)
    assert counts.tolist() == [0, 0, 0, 3, 0, 1, 0, 1, 0, 1, 0, 0]
    assert frequent_tokens([a, b], 1, vocab_size=12).tolist() == [3]
    # ties (5, 7, 9 once each) go to the lower id
    assert frequent_tokens([a, b], 3, vocab_size=12).tolist() == [3, 5, 7]
    # always-included ids (EOS) are in, whatever their count; the rest by frequency; sorted
    assert frequent_tokens([a, b], 3, always=(2,), vocab_size=12).tolist() == [2, 3, 5]
    # beyond the counted tokens, unseen ids fill in from the lowest
    assert frequent_tokens([a, b], 6, vocab_size=12).tolist() == [0, 1, 3, 5, 7, 9]
    out = frequent_tokens([a, b], 4, always=[11, 11])
    assert out.dtype == torch.int64 and out.tolist() == [3, 5, 7, 11]


@pytest.mark.parametrize("size, always, vocab_size, message", [
    (0, (), 12, r"size 0 outside 1\.\.12"),
    (13, (), 12, r"size 13 outside 1\.\.12"),
    (1, (2, 3), 12, "cannot hold the 2 always-included"),
    (2, (12,), 12, "outside the vocabulary of 12"),
    (11, (), None, "exceeds the 10 ids"),
])
def test_frequent_tokens_errors(size, always, vocab_size, message):
    with pytest.raises(ValueError, match=message):
        frequent_tokens([_record([9, 7, 7, 3, 9, 7, 5], [1, 0, 1, 1, 1, 0, 1])], size, always=always,
                        vocab_size=vocab_size)
    with pytest.raises(ValueError, match="target token 7 outside the vocabulary of 6"):
        count_targets([_record([1, 7], [0, 1])], vocab_size=6)


def test_counted_tokens_are_the_targets_greedy_choices_at_the_loss_positions(tiny_llava_dir):
    """On a greedy continuation the counted token of each weighted prediction is the argmax of the
    distribution the loss uses as its soft target (the next position's feature through lm_head)."""
    engine = Engine.load(tiny_llava_dir, dtype="float32", max_seq_len=64)
    engine.config = dataclasses.replace(engine.config, eos_token_ids=())
    prompt = [1, 450, 4996, 17354, 1701]
    cont = engine.generate(input_ids=prompt, max_new_tokens=12).token_ids
    rec = record_from_target(engine.model, engine.cache, torch.tensor(prompt + cont), None, len(prompt), None)
    lm_head = engine.model.text.lm_head.float()
    # draft_loss: prediction i <-> target feature i+1, weight loss_mask[i+1]
    soft_target_argmax = (rec.features[1:] @ lm_head.T).argmax(-1)[rec.loss_mask[1:] > 0]
    assert draft_targets(rec.token_ids, rec.loss_mask).tolist() == soft_target_argmax.tolist()
    assert len(soft_target_argmax) == len(cont)


def test_reduced_vocab_cross_entropy_matches_a_plain_reference():
    g = torch.Generator().manual_seed(0)
    b, n, h, v = 2, 7, 8, 30
    pred, target = torch.randn(b, n, h, generator=g), torch.randn(b, n, h, generator=g)
    lm_head = torch.randn(v, h, generator=g)
    mask = torch.tensor([[0, 1, 1, 0, 1, 1, 1], [0, 0, 1, 1, 1, 0, 0]], dtype=torch.float32)
    vocab = torch.tensor([0, 2, 3, 7, 11, 12, 19, 25, 29])
    loss, stats = draft_loss(pred, target, mask, lm_head, vocab)
    ce_sum, agree, weight = 0.0, 0.0, 0.0
    for row in range(b):
        for i in range(n - 1):
            if mask[row, i + 1] == 0:
                continue
            full_p = torch.softmax(lm_head @ target[row, i + 1], -1)      # the target's distribution over V
            p = full_p[vocab] / full_p[vocab].sum()                         # restricted, renormalised
            q_logits = lm_head[vocab] @ pred[row, i]                        # the reduced head
            ce_sum += float(-(p * torch.log_softmax(q_logits, -1)).sum())
            agree += float(q_logits.argmax() == p.argmax())
            weight += 1.0
    assert stats["ce_loss"] == pytest.approx(ce_sum / weight, rel=1e-5)
    assert stats["acc"] == pytest.approx(agree / weight)
    full_loss, full_stats = draft_loss(pred, target, mask, lm_head)
    assert stats["feature_loss"] == pytest.approx(full_stats["feature_loss"], rel=1e-6)  # unchanged
    assert float(loss) == pytest.approx(stats["feature_loss"] + CE_WEIGHT * stats["ce_loss"], rel=1e-6)
    assert stats["ce_loss"] < full_stats["ce_loss"]  # fewer classes: a smaller cross-entropy here
    with pytest.raises(ValueError, match="draft_vocab must be int64"):
        draft_loss(pred, target, mask, lm_head, vocab.int())


def test_module_holds_the_draft_vocab_as_a_buffer():
    config = dataclasses.replace(CONFIG, draft_vocab_size=5)
    vocab = torch.tensor([1, 2, 5, 30, 39])
    module = DraftModule.from_config(config, torch.randn(40, 16), draft_vocab=vocab)
    state = module.state_dict()
    assert {k: tuple(t.shape) for k, t in state.items()} == draft_expected_shapes(config)
    assert state[DRAFT_VOCAB_KEY].dtype == torch.int64 and torch.equal(state[DRAFT_VOCAB_KEY], vocab)
    assert DRAFT_VOCAB_KEY not in dict(module.named_parameters())
    assert module.to(torch.float16).state_dict()[DRAFT_VOCAB_KEY].dtype == torch.int64
    weights = {k: t.clone() for k, t in state.items()}
    for bad, message in ((torch.tensor([1, 2, 2, 30, 39]), "sorted ascending and unique"),
                         (torch.tensor([1, 2, 5, 30, 40]), r"outside 0\.\.39"),
                         (vocab.float(), "must be int64")):
        with pytest.raises(ValueError, match=message):
            module.load_weights({**weights, DRAFT_VOCAB_KEY: bad})
    with pytest.raises(ValueError, match="draft_vocab missing"):
        DraftModule.from_config(config, torch.randn(40, 16))
    with pytest.raises(ValueError, match="draft_vocab given"):
        DraftModule.from_config(CONFIG, torch.randn(40, 16), draft_vocab=vocab)


def _random_records(count: int = 3) -> list[DraftRecord]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(count):
        n = int(torch.randint(5, 10, (1,), generator=g))
        out.append(DraftRecord(torch.randint(0, 40, (n,), generator=g), torch.randn(n, 16, generator=g),
                               (torch.rand(n, generator=g) < 0.7).float()))
    return out


def test_checkpoint_converts_with_its_draft_vocab(tmp_path):
    records = _random_records()
    vocab = frequent_tokens(records, 8, always=(2,), vocab_size=40)
    config = dataclasses.replace(CONFIG, draft_vocab_size=8)
    g = torch.Generator().manual_seed(2)
    lm_head, embed = torch.randn(40, 16, generator=g), torch.randn(40, 16, generator=g)
    kw = dict(epochs=1, lr=1e-3, warmup_steps=1, draft_vocab=vocab, progress=False)
    result = train_draft(records, lm_head, embed, config, tmp_path / "run", **kw)
    ckpt = result.checkpoint
    assert json.loads((ckpt / "config.json").read_text())["draft_vocab_size"] == 8
    saved = load_file(str(ckpt / "model.safetensors"))
    assert saved[DRAFT_VOCAB_KEY].dtype == torch.int64 and torch.equal(saved[DRAFT_VOCAB_KEY], vocab)
    assert saved["fc.weight"].dtype == torch.float32

    converted = convert_msd_draft(ckpt, tmp_path / "draft", mode="msd", dtype="float16", progress=False)
    assert converted.draft_vocab_size == 8
    assert DraftConfig.load(tmp_path / "draft" / "config.json") == converted
    out = load_file(str(tmp_path / "draft" / "model.safetensors"))
    assert out[DRAFT_VOCAB_KEY].dtype == torch.int64 and torch.equal(out[DRAFT_VOCAB_KEY], vocab)
    assert out["fc.weight"].dtype == torch.float16
    loaded = load_draft_weights(tmp_path / "draft", converted, torch.float16, "cpu")
    assert torch.equal(loaded[DRAFT_VOCAB_KEY], vocab)

    # the vocabulary must match the config, and a resumed run the checkpoint's
    with pytest.raises(ValueError, match="draft_vocab missing"):
        train_draft(records, lm_head, embed, config, tmp_path / "bad", **{**kw, "draft_vocab": None})
    with pytest.raises(ValueError, match=r"must be int64 \[8\]"):
        train_draft(records, lm_head, embed, config, tmp_path / "bad", **{**kw, "draft_vocab": vocab[:7]})
    other = torch.arange(8)
    with pytest.raises(ValueError, match="another draft vocabulary"):
        train_draft(records, lm_head, embed, config, tmp_path / "run", **{**kw, "draft_vocab": other, "resume": True})
