"""The demo recipe's training stages chained on the tiny LLaVA: each stage starts from the last one's
weights, and a second run of the recipe resumes every stage as finished (no step re-run)."""
from __future__ import annotations

import json

import torch

from msd_engine.cli import main
from msd_engine.demo.recipe import Recipe, train_drafts
from msd_engine.train.trainer import STATE_FILE
from tests.test_train_data import make_dataset

RECIPE = Recipe(epochs=1, text_epochs=0, ramp_epochs=0, extra_epochs=1, finetune_epochs=1, finetune_lr=1e-3,
                unroll_epochs=1, unroll_extra_epochs=1, unroll_steps=2, unroll_lr=1e-3, self_prompts=1, self_epochs=1,
                self_lr=1e-3, ce_weights=(0.5, 1.0), lr=1e-3, warmup=1, batch_size=1, draft_vocab=16)


def _steps(run):
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_the_stages_chain_and_resume(tiny_llava_dir, tmp_path, capsys):
    data = make_dataset(tmp_path)
    shards = [tmp_path / "first", tmp_path / "added", tmp_path / "later"]
    for out in shards:
        assert main(["train-data", "--model", str(tiny_llava_dir), "--data", str(data), "--images",
                     str(tmp_path / "img"), "--out", str(out), "--max-len", "200"]) == 0
    records = int(capsys.readouterr().out.split(" records")[0].split()[-1])
    work = tmp_path / "work"
    out = train_drafts(tiny_llava_dir, shards[:1], work, RECIPE, ["msd"], None, progress=False, added=shards[1:2],
                       later=shards[2:])
    runs = work / "runs"
    # stage 1 (1 epoch) resumed as stage 2 (stretched to 2); stage 3: 1 epoch over both sets;
    # stage 4: 1 unrolled epoch over both, resumed stretched to 2; stage 5: 1 unrolled epoch over the later set;
    # stage 6: that again, the cross-entropy weighted 0.5; then once more, weighted 1.0
    assert _steps(runs / "msd") == list(range(1, 2 * records + 1))
    assert _steps(runs / "msd-finetune") == list(range(1, 2 * records + 1))
    assert _steps(runs / "msd-unroll") == list(range(1, 4 * records + 1))
    assert _steps(runs / "msd-self") == list(range(1, records + 1))
    assert _steps(runs / "msd-ce") == list(range(1, records + 1))
    assert _steps(runs / "msd-ce2") == list(range(1, records + 1))
    init = {name: json.loads((runs / name / "init_from.json").read_text())["checkpoint"]
            for name in ("msd-finetune", "msd-unroll", "msd-self", "msd-ce", "msd-ce2")}
    assert init == {"msd-finetune": str(runs / "msd" / f"checkpoint-{2 * records}"),
                    "msd-unroll": str(runs / "msd-finetune" / f"checkpoint-{2 * records}"),
                    "msd-self": str(runs / "msd-unroll" / f"checkpoint-{4 * records}"),
                    "msd-ce": str(runs / "msd-self" / f"checkpoint-{records}"),
                    "msd-ce2": str(runs / "msd-ce" / f"checkpoint-{records}")}
    for name, weight, seed in (("msd-unroll", 0.1, 0), ("msd-self", 0.1, 0), ("msd-ce", 0.5, 1), ("msd-ce2", 1.0, 2)):
        rows = [json.loads(line) for line in (runs / name / "metrics.jsonl").read_text().splitlines()]
        assert all("acc_2" in r and "acc_3" not in r for r in rows)
        # an unrolled step's loss: the steps' (feature + w * ce) weighted; step 1 alone is logged, so
        # only the checkpoint's record of w is checked here (test_train_loop checks w reaches the loss)
        state = torch.load(runs / name / f"checkpoint-{rows[-1]['step']}" / STATE_FILE, weights_only=True)
        assert state["ce_weight"] == weight
        assert state["seed"] == RECIPE.seed + seed  # each stage-6 pass its own batch order
    config = json.loads((out["msd"] / "config.json").read_text())
    assert config["mode"] == "msd" and config["draft_vocab_size"] == 16
    before = {name: _steps(runs / name) for name in ("msd", "msd-finetune", "msd-unroll", "msd-self", "msd-ce", "msd-ce2")}
    train_drafts(tiny_llava_dir, shards[:1], work, RECIPE, ["msd"], None, progress=False, added=shards[1:2],
                 later=shards[2:])
    assert {name: _steps(runs / name) for name in before} == before
