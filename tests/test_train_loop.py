"""Draft training end to end on the tiny LLaVA target: the loss falls, the checkpoint is the
released format (converts and loads), speculative decoding with it stays lossless and accepts more
than an untrained draft, and a resumed run replays the uninterrupted one."""
from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from msd_engine import Engine
from msd_engine.convert.msd_draft import convert_msd_draft
from msd_engine.draft.init import draft_config_for
from msd_engine.spec.tree import TreeParams
from msd_engine.train.curriculum import Curriculum
from msd_engine.train.module import DraftModule
from msd_engine.train.records import record_from_target
from msd_engine.train.trainer import STATE_FILE, lr_factor, restore, train_draft
from tests.factories import IMAGE_TOKEN_ID, SPECS, image_tokens
from tests.spec_doubles import write_random_draft

TREE = TreeParams(top_k=4, depth=4, total_tokens=12)
EPOCHS = 100


def no_eos(engine: Engine) -> Engine:
    engine.config = dataclasses.replace(engine.config, eos_token_ids=())
    return engine


def _prompts():
    spec = SPECS["gqa"]
    out = []
    for seed in range(4):
        g = torch.Generator().manual_seed(100 + seed)
        text = torch.randint(3, 32000, (4,), generator=g).tolist()
        if seed % 2 == 0:
            pixels = torch.randn(1, 3, spec.image_size, spec.image_size, generator=g)
            out.append(([1, text[0], IMAGE_TOKEN_ID] + text[1:], pixels))
        else:
            out.append(([1] + text, None))
    return out


@pytest.fixture(scope="module")
def target(tiny_llava_dir):
    return no_eos(Engine.load(tiny_llava_dir, dtype="float32", max_seq_len=96))


@pytest.fixture(scope="module")
def data(target):
    """The target's own greedy continuations (16 tokens) of 4 prompts, 2 with an image."""
    prompts, records = [], []
    for ids, pixels in _prompts():
        cont = target.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=16).token_ids
        expanded = [t for i in ids for t in ([i] * image_tokens(SPECS["gqa"]) if i == IMAGE_TOKEN_ID else [i])]
        start = len(expanded)
        expanded = torch.tensor(expanded + cont)
        records.append(record_from_target(target.model, target.cache, expanded, pixels, start, IMAGE_TOKEN_ID))
        prompts.append((ids, pixels, cont))
    assert [r.is_visual for r in records] == [True, False, True, False]
    return prompts, records


def _train(target, records, out_dir, **kw):
    config = draft_config_for(target.config, "msd")
    args = dict(epochs=EPOCHS, lr=3e-3, warmup_steps=8, batch_size=1, curriculum=Curriculum(10, 19, EPOCHS),
                save_every=0, seed=0)
    args.update(kw)
    return train_draft(records, target.model.text.lm_head, target.model.text.embed_tokens, config, out_dir, **args)


@pytest.fixture(scope="module")
def trained(target, data, tmp_path_factory):
    return _train(target, data[1], tmp_path_factory.mktemp("train") / "run")


def test_loss_decreases_and_metrics_are_logged(trained):
    rows = [json.loads(line) for line in (trained.checkpoint.parent / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, trained.step + 1))
    assert {"step", "epoch", "loss", "feature_loss", "ce_loss", "acc", "lr"} <= set(rows[0])
    def mean(key, epochs):
        values = [r[key] for r in rows if r["epoch"] in epochs]
        return sum(values) / len(values)

    first, last = (1, 2), (EPOCHS,)
    assert mean("loss", last) < mean("loss", first) - 0.3
    # the soft-CE term cannot fall below the entropy of the target's (near-uniform, random) next-token
    # distribution, so the memorisation shows in the feature regression and the top-1 agreement
    assert mean("feature_loss", last) < 0.05 * mean("feature_loss", first)
    assert mean("acc", last) > 0.8 > mean("acc", first)
    # text-only epochs 1-4 see the 2 text records; the final epoch sees all 4
    assert sum(r["epoch"] == 1 for r in rows) == 2 and sum(r["epoch"] == EPOCHS for r in rows) == 4


def test_checkpoint_is_released_format_lossless_and_beats_untrained(tiny_llava_dir, target, data, trained,
                                                                    tmp_path):
    ckpt = trained.checkpoint
    assert ckpt.name == f"checkpoint-{trained.step}" and (ckpt / STATE_FILE).is_file()
    hf = json.loads((ckpt / "config.json").read_text())
    assert hf["num_hidden_layers"] == 1
    converted = convert_msd_draft(ckpt, tmp_path / "trained", mode="msd", dtype="float32", progress=False)
    assert converted.mode == "msd"
    untrained = write_random_draft(target, tmp_path / "untrained", "msd", seed=0, std=0.02)
    taus = {}
    for name, draft in (("trained", tmp_path / "trained"), ("untrained", untrained)):
        spec = no_eos(Engine.load(tiny_llava_dir, dtype="float32", max_seq_len=96, draft=draft, tree=TREE))
        tau = []
        for ids, pixels, cont in data[0]:
            fast = spec.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=16)
            assert fast.token_ids == cont  # lossless: the target's greedy continuation
            tau.append(fast.stats["tau"])
        taus[name] = sum(tau) / len(tau)
    assert taus["trained"] > taus["untrained"] + 0.5, taus


def test_resume_replays_the_uninterrupted_run(target, data, tmp_path):
    records = data[1]
    kw = dict(epochs=3, batch_size=2, save_every=2, curriculum=None, warmup_steps=2)
    full = _train(target, records, tmp_path / "full", **kw)
    assert full.step == 6
    part = _train(target, records, tmp_path / "part", **kw)
    for step in (4, 6):
        shutil.rmtree(tmp_path / "part" / f"checkpoint-{step}")

    # restoring brings back exactly the saved optimizer state and step
    config = draft_config_for(target.config, "msd")
    module = DraftModule.from_config(config, target.model.text.embed_tokens, seed=99)
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1.0, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, 2, 6, "cosine"))
    state = restore(tmp_path / "part" / "checkpoint-2", module, opt, sched)
    saved = torch.load(tmp_path / "part" / "checkpoint-2" / STATE_FILE, weights_only=True)
    assert state["step"] == 2 and sched.last_epoch == 2
    _assert_same(opt.state_dict(), saved["optimizer"])
    assert part.metrics[-1]["step"] == 6

    resumed = _train(target, records, tmp_path / "part", resume=True, **kw)
    assert resumed.step == 6 and [m["step"] for m in resumed.metrics] == [3, 4, 5, 6]
    a = load_file(str(full.checkpoint / "model.safetensors"))
    b = load_file(str(resumed.checkpoint / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-6, rtol=1e-5)
    _assert_same(torch.load(resumed.checkpoint / STATE_FILE, weights_only=True)["optimizer"],
                 torch.load(full.checkpoint / STATE_FILE, weights_only=True)["optimizer"], tol=1e-6)
    steps = [json.loads(x)["step"] for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_resume_with_more_epochs_continues_on_the_stretched_schedule(target, data, tmp_path):
    """The demo recipe's second stage: the finished run's checkpoint, resumed with more epochs, runs
    only the new steps, at the lr the longer cosine schedule has there."""
    kw = dict(batch_size=2, save_every=0, curriculum=None, warmup_steps=2, lr=1e-3)
    first = _train(target, data[1], tmp_path / "run", epochs=2, **kw)
    assert first.step == 4 and first.metrics[-1]["lr"] == pytest.approx(1e-3 * lr_factor(3, 2, 4, "cosine"))
    second = _train(target, data[1], tmp_path / "run", epochs=5, resume=True, **kw)
    assert second.step == 10 and [m["step"] for m in second.metrics] == [5, 6, 7, 8, 9, 10]
    for row in second.metrics:
        assert row["lr"] == pytest.approx(1e-3 * lr_factor(row["step"] - 1, 2, 10, "cosine"))
    assert second.metrics[0]["lr"] > 0.8e-3  # back up from 0.5e-3, where the first schedule ended


def _assert_same(a, b, tol=0.0):
    if isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k], tol)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y, tol)
    else:
        assert a == b


def test_init_from_starts_a_new_schedule_from_the_checkpoints_weights(target, data, trained, tmp_path):
    """Fine-tuning (the demo recipe's third stage): a fresh run in a new directory that starts from a
    trained checkpoint's weights, with its own optimizer and lr schedule."""
    kw = dict(epochs=1, batch_size=2, curriculum=None, warmup_steps=1)
    start = load_file(str(trained.checkpoint / "model.safetensors"))
    tuned = _train(target, data[1], tmp_path / "tuned", init_from=trained.checkpoint, lr=1e-12, **kw)
    assert [m["step"] for m in tuned.metrics] == [1, 2] and tuned.metrics[0]["lr"] == pytest.approx(1e-12)
    after = load_file(str(tuned.checkpoint / "model.safetensors"))
    for name in start:  # an lr of 1e-12 leaves the loaded weights where they were
        torch.testing.assert_close(after[name], start[name], atol=1e-6, rtol=0)
    fresh = _train(target, data[1], tmp_path / "fresh", lr=1e-12, **kw)
    assert tuned.metrics[0]["loss"] < fresh.metrics[0]["loss"] - 0.3  # the trained draft's loss, not a new one's


def test_unrolled_training_logs_every_step_and_learns(target, data, trained, tmp_path):
    """unroll_steps (the recipe's fourth stage): step 1's statistics are a plain run's, the later
    steps' top-1 is logged as acc_k, and training raises the later steps' agreement (plain training
    would too here; that unrolling beats it is measured on the demo drafts, README stage 4)."""
    kw = dict(epochs=1, batch_size=2, curriculum=None, warmup_steps=1, init_from=trained.checkpoint, lr=1e-12)
    plain = _train(target, data[1], tmp_path / "plain", **kw)
    still = _train(target, data[1], tmp_path / "still", unroll_steps=3, **kw)
    for a, b in zip(plain.metrics, still.metrics):  # same weights, same noise: step 1 is the plain step
        for key in ("feature_loss", "ce_loss", "acc", "positions"):
            assert b[key] == pytest.approx(a[key], rel=1e-6), key
        assert "acc_2" not in a and {"acc_2", "acc_3"} <= b.keys() and "acc_4" not in b
    epochs = 30
    taught = _train(target, data[1], tmp_path / "taught", **{**kw, "lr": 3e-3, "epochs": epochs, "init_from": None},
                    unroll_steps=3)  # from a fresh draft: `trained` already agrees at step 3
    rows = taught.metrics
    def mean(key, epoch):
        values = [r[key] for r in rows if r["epoch"] == epoch]
        return sum(values) / len(values)
    assert mean("acc_3", epochs) > mean("acc_3", 1) + 0.2
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="unroll_steps must be an int >= 1"):
            _train(target, data[1], tmp_path / "bad", unroll_steps=bad, **kw)
    # one run, one objective: resuming with another depth is refused
    with pytest.raises(ValueError, match=r"checkpoint-\d+ was trained with unroll_steps 3, this run has 2"):
        _train(target, data[1], tmp_path / "still", unroll_steps=2, resume=True, **{**kw, "epochs": 2})
    # ... or with another cross-entropy weight (the run above used the default, 0.1)
    with pytest.raises(ValueError, match=r"checkpoint-\d+ was trained with ce_weight 0.1, this run has 0.5"):
        _train(target, data[1], tmp_path / "still", unroll_steps=3, ce_weight=0.5, resume=True,
               **{**kw, "epochs": 2})
    for bad in (-0.1, float("nan"), float("inf"), True, "0.5"):
        with pytest.raises(ValueError, match="ce_weight must be a finite number >= 0"):
            _train(target, data[1], tmp_path / "bad", ce_weight=bad, **kw)


def test_ce_weight_reaches_the_loss(target, data, trained, tmp_path):
    """Same weights, same batches: a run with ce_weight w logs loss = feature_loss + w * ce_loss."""
    kw = dict(epochs=1, batch_size=2, curriculum=None, warmup_steps=1, init_from=trained.checkpoint, lr=1e-12)
    for weight in (0.1, 0.5):
        rows = _train(target, data[1], tmp_path / f"ce{weight}", ce_weight=weight, **kw).metrics
        for r in rows:
            assert r["loss"] == pytest.approx(r["feature_loss"] + weight * r["ce_loss"], rel=1e-5)


def test_a_resumed_fine_tune_must_have_started_from_the_same_weights(target, data, trained, tmp_path):
    kw = dict(batch_size=2, curriculum=None, warmup_steps=1, lr=1e-3)
    first = _train(target, data[1], tmp_path / "run", epochs=1, init_from=trained.checkpoint, **kw)
    assert json.loads((tmp_path / "run" / "init_from.json").read_text())["checkpoint"] == str(trained.checkpoint)
    other = _train(target, data[1], tmp_path / "other", epochs=1, **kw)  # weights far from `first`'s
    # init_from changed since the run started: an error, not a silently stale fine-tune
    with pytest.raises(ValueError, match=r"init_from .*other.*started from .*checkpoint-"):
        _train(target, data[1], tmp_path / "run", epochs=2, resume=True, init_from=other.checkpoint, **kw)
    with pytest.raises(ValueError, match=r"init_from .* started from no init_from"):
        _train(target, data[1], tmp_path / "other", epochs=2, resume=True, init_from=trained.checkpoint, **kw)
    second = _train(target, data[1], tmp_path / "run", epochs=2, resume=True, init_from=trained.checkpoint, **kw)
    assert second.step == 4 and [m["step"] for m in second.metrics] == [3, 4]
    # it went on from its own checkpoint (the trained draft's weights), not from a fresh draft's
    assert second.metrics[0]["loss"] < other.metrics[-1]["loss"] - 0.3
    assert second.metrics[0]["loss"] < first.metrics[-1]["loss"] + 0.3


def test_bad_init_from_is_named(target, data, trained, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"init_from .*nowhere.*config\.json"):
        _train(target, data[1], tmp_path / "a", epochs=1, curriculum=None, init_from=tmp_path / "nowhere")
    wider = tmp_path / "wider"
    shutil.copytree(trained.checkpoint, wider)
    config = json.loads((wider / "config.json").read_text())
    (wider / "config.json").write_text(json.dumps({**config, "intermediate_size": config["intermediate_size"] * 2}))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "metrics.jsonl").write_text("{}\n")  # a reused directory keeps what it had
    with pytest.raises(ValueError, match=r"init_from .*wider.*intermediate_size"):
        _train(target, data[1], tmp_path / "b", epochs=1, curriculum=None, init_from=wider)
    assert (tmp_path / "b" / "metrics.jsonl").read_text() == "{}\n"
    config = draft_config_for(target.config, "msd", draft_vocab_size=64)
    vocab = torch.arange(0, 64, dtype=torch.int64)
    def reduced(out, init_from=None, draft_vocab=vocab):
        return train_draft(data[1], target.model.text.lm_head, target.model.text.embed_tokens, config, out,
                           epochs=1, warmup_steps=1, draft_vocab=draft_vocab, init_from=init_from)
    # trained on the whole vocabulary: a reduced-vocabulary run cannot start from it
    with pytest.raises(ValueError, match=r"init_from .*draft_vocab_size \(checkpoint 0, this run 64\)"):
        reduced(tmp_path / "c", init_from=trained.checkpoint)
    small = reduced(tmp_path / "small")
    with pytest.raises(ValueError, match=r"init_from .* another draft vocabulary"):
        reduced(tmp_path / "d", init_from=small.checkpoint, draft_vocab=vocab + 1)
    for run in "bcd":
        assert not list((tmp_path / run).glob("checkpoint-*"))
    tuned = reduced(tmp_path / "e", init_from=small.checkpoint)
    assert torch.equal(load_file(str(tuned.checkpoint / "model.safetensors"))["draft_vocab"], vocab)
