"""`msd-engine tune`: the EAGLE-2 tree-size rule, its per-device cache, and Engine.load using it."""
from __future__ import annotations

import json

import pytest
import torch

from msd_engine import Engine
from msd_engine.cli import main
from msd_engine.spec import tune
from msd_engine.spec.pause import PausePolicy
from msd_engine.spec.tree import TreeParams


def test_tune_picks_the_argmin_of_time_over_gain(tiny_llava_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("MSD_ENGINE_CACHE", str(tmp_path))
    engine = Engine.load(tiny_llava_dir, dtype="float32", max_seq_len=128)
    best, timings = tune.tune_total_tokens(engine.model, engine.cache, engine.device, prefix=32, repeats=2)
    gains = tune.candidates_for(engine.device)
    assert set(timings) == set(gains) and max(gains) <= 32  # a CPU's candidates are small trees
    assert best == min(gains, key=lambda t: timings[t] / gains[t])
    assert all(ms > 0 for ms in timings.values())


def test_tuned_size_is_cached_per_device_and_model_and_used_by_load(tiny_llava_dir, smollm2_float32,
                                                                     monkeypatch, tmp_path):
    monkeypatch.setenv("MSD_ENGINE_CACHE", str(tmp_path))
    engine = Engine.load(tiny_llava_dir, dtype="float32", max_seq_len=128)
    assert engine.tree == TreeParams()  # nothing tuned yet
    dtype = engine.model.text.embed_tokens.dtype
    tune.save_tuned(engine.device, engine.config, dtype, 12, {12: 1.0})
    assert tune.load_tuned(engine.device, engine.config, dtype) == TreeParams(total_tokens=12)
    assert Engine.load(tiny_llava_dir, dtype="float32", max_seq_len=128).tree.total_tokens == 12
    # Another model, or another dtype, is not affected.
    other = Engine.load(smollm2_float32, dtype="float32", max_seq_len=64)
    assert tune.load_tuned(other.device, other.config, dtype) is None
    assert Engine.load(tiny_llava_dir, dtype="bfloat16", max_seq_len=128).tree == TreeParams()
    # An explicit tree wins over the tuning.
    assert Engine.load(tiny_llava_dir, dtype="float32", max_seq_len=128, tree=TreeParams(2, 2, 5)).tree.total_tokens == 5


def test_cpu_tuning_is_kept_per_simd_path(tiny_llava_dir, monkeypatch, tmp_path):
    """What a verified row costs depends on the native kernels' SIMD path, so a tree tuned on one
    path is not read back on another."""
    from msd_engine import native
    if not native.is_built():
        pytest.skip("needs msd_engine._C")
    monkeypatch.setenv("MSD_ENGINE_CACHE", str(tmp_path))
    engine = Engine.load(tiny_llava_dir, dtype="float32", max_seq_len=128)
    dtype = engine.model.text.embed_tokens.dtype
    best = native.cpu_isa()
    assert f":{best}:" in tune.device_key(engine.device)
    tune.save_tuned(engine.device, engine.config, dtype, 12, {12: 1.0})
    try:
        native.set_cpu_isa("scalar")
        assert tune.load_tuned(engine.device, engine.config, dtype) is None
    finally:
        native.set_cpu_isa(None)
    assert tune.load_tuned(engine.device, engine.config, dtype) == TreeParams(total_tokens=12)


def test_damaged_cache_is_ignored(tiny_llava_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("MSD_ENGINE_CACHE", str(tmp_path))
    (tmp_path / "tune.json").write_text("{not json")
    assert Engine.load(tiny_llava_dir, dtype="float32", max_seq_len=128).tree == TreeParams()


def test_cli_tune(tiny_llava_dir, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("MSD_ENGINE_CACHE", str(tmp_path))
    assert main(["tune", "--model", str(tiny_llava_dir), "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "<- best" in out and "total_tokens =" in out
    assert (tmp_path / "tune.json").is_file()


@pytest.mark.parametrize("flags, tree", [
    (["--top-k", "3", "--depth", "2", "--total-tokens", "6"], TreeParams(3, 2, 6)),
    (["--total-tokens", "8"], TreeParams(10, 5, 8)),
])
def test_cli_generate_with_draft_and_tree_flags(tiny_llava_dir, tmp_path, capsys, flags, tree):
    import json

    from tests.spec_doubles import write_random_draft

    draft = write_random_draft(Engine.load(tiny_llava_dir, dtype="float32"), tmp_path / "draft")
    base = ["generate", "--model", str(tiny_llava_dir), "--prompt", "hi", "--max-new-tokens", "6",
            "--dtype", "float32", "--json", "--draft", str(draft)]
    assert main(base + flags) == 0
    spec = json.loads(capsys.readouterr().out)
    assert "tau" in spec["stats"] and "accepted_histogram" in spec["stats"]
    assert spec["stats"]["tree_nodes"] <= tree.total_tokens * spec["stats"]["verify_forwards"]
    assert main(base + flags + ["--no-spec"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert "tau" not in plain["stats"] and plain["token_ids"] == spec["token_ids"]
    assert main(base + flags + ["--draft-dtype", "bfloat16"]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == plain["token_ids"]


def test_measured_tree_tuning_is_cached_per_draft_and_used_by_load(tiny_llava_dir, monkeypatch, tmp_path):
    from tests.spec_doubles import write_random_draft

    monkeypatch.setenv("MSD_ENGINE_CACHE", str(tmp_path))
    draft = write_random_draft(Engine.load(tiny_llava_dir, dtype="float32"), tmp_path / "draft")
    trees = (TreeParams(2, 2, 4), TreeParams(3, 3, 8))
    engine = Engine.load(tiny_llava_dir, dtype="float32", max_seq_len=128, draft=draft, tree=tune.scratch_tree(trees))
    # A policy that would pause from the first round: tuning measures rounds, so it must not pause.
    engine.pause = PausePolicy(break_even=50.0, first_rounds=1, first_pause=2)
    plain_steps = []
    real_generate = engine.generate
    engine.generate = lambda *a, **k: (r := real_generate(*a, **k), plain_steps.append(r.stats.get("plain_steps")))[0]
    tuning = tune.tune_tree(engine, [("hello there", None)], trees, max_new_tokens=6)
    del engine.generate
    assert plain_steps and set(plain_steps) <= {0, None}  # None: the plain decoding runs
    rates = tuning.rates
    assert set(rates) == set(trees) and tuning.best == tune.pick_tree(rates) and all(r > 0 for r in rates.values())
    assert tuning.plain_tokens_per_s > 0 and set(tuning.round_costs) == set(trees)
    assert all(c > 0 for c in tuning.round_costs.values())
    assert engine.tree == tune.scratch_tree(trees)  # tuning leaves the engine's own tree alone
    assert engine.pause == PausePolicy(break_even=50.0, first_rounds=1, first_pause=2)  # and its pause policy
    dtype = engine.model.text.embed_tokens.dtype
    key = tune.draft_key(draft)
    tune.save_tree_tuning(engine.device, engine.config, dtype, tuning, draft=key)
    for tree, cost in tuning.round_costs.items():
        assert tune.load_tuned_round_cost(engine.device, engine.config, dtype, key, tree) == pytest.approx(cost)
    tune.save_tuned(engine.device, engine.config, dtype, TreeParams(3, 3, 8), rates, draft=key,
                    round_costs={TreeParams(3, 3, 8): 1.75, TreeParams(2, 2, 4): 0.5},
                    plain_tokens_per_s=tuning.plain_tokens_per_s)
    assert tune.load_tuned(engine.device, engine.config, dtype, key) == TreeParams(3, 3, 8)
    # pause_below="auto" (the default) takes the tuned tree's round cost; a cost under one plain
    # step still never pauses more than a break-even of 1 would; other trees have none measured
    loaded = Engine.load(tiny_llava_dir, dtype="float32", max_seq_len=128, draft=draft)
    assert loaded.pause == PausePolicy(break_even=1.75)
    assert Engine.load(tiny_llava_dir, dtype="float32", max_seq_len=128, draft=draft,
                       tree=TreeParams(2, 2, 4)).pause == PausePolicy(break_even=1.0)
    assert Engine.load(tiny_llava_dir, dtype="float32", max_seq_len=128, draft=draft,
                       tree=TreeParams(4, 2, 8)).pause is None
    assert Engine.load(tiny_llava_dir, dtype="float32", max_seq_len=128, draft=draft, pause_below=None).pause is None
    assert Engine.load(tiny_llava_dir, dtype="float32", max_seq_len=128, draft=draft,
                       pause_below=2.5).pause == PausePolicy(break_even=2.5)
    with pytest.raises(ValueError, match="pause_below must be a number, 'auto' or None"):
        Engine.load(tiny_llava_dir, dtype="float32", max_seq_len=128, draft=draft, pause_below="tuned")
    assert tune.load_tuned(engine.device, engine.config, dtype) is None  # only for that draft
    assert Engine.load(tiny_llava_dir, dtype="float32", max_seq_len=128, draft=draft).tree == TreeParams(3, 3, 8)
    assert Engine.load(tiny_llava_dir, dtype="float32", max_seq_len=128).tree == TreeParams()
    # a draft run in another precision is timed apart: the float32 entry does not apply to it
    half = tune.draft_key(draft, torch.bfloat16, dtype)
    assert half != key and tune.draft_key(draft, dtype, dtype) == key
    assert Engine.load(tiny_llava_dir, dtype="float32", max_seq_len=128, draft=draft,
                       draft_dtype="bfloat16").tree == TreeParams()
    tune.save_tuned(engine.device, engine.config, dtype, TreeParams(2, 2, 4), rates, draft=half)
    assert Engine.load(tiny_llava_dir, dtype="float32", max_seq_len=128, draft=draft,
                       draft_dtype="bfloat16").tree == TreeParams(2, 2, 4)
    # a retrained draft whose file differs only in its last byte is another draft: not its tree
    weights = draft / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert tune.draft_key(draft) != key
    assert Engine.load(tiny_llava_dir, dtype="float32", max_seq_len=128, draft=draft).tree == TreeParams()


def test_cli_measured_tune(tiny_llava_dir, monkeypatch, tmp_path, capsys):
    import json

    from tests.spec_doubles import write_random_draft

    monkeypatch.setenv("MSD_ENGINE_CACHE", str(tmp_path))
    monkeypatch.setattr(tune, "CPU_TREES", (TreeParams(2, 2, 4), TreeParams(3, 2, 6)))
    draft = write_random_draft(Engine.load(tiny_llava_dir, dtype="float32"), tmp_path / "draft")
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"prompt": "hi"}]))
    assert main(["tune", "--model", str(tiny_llava_dir), "--dtype", "float32", "--draft", str(draft),
                 "--prompts", str(prompts), "--max-new-tokens", "4"]) == 0
    assert "<- best" in capsys.readouterr().out
    assert main(["tune", "--model", str(tiny_llava_dir), "--draft", str(draft)]) == 2  # --prompts missing


def test_pick_tree_takes_the_cheapest_of_the_trees_tied_with_the_fastest():
    rates = {TreeParams(4, 3, 6): 79.8, TreeParams(4, 1, 6): 79.2, TreeParams(3, 1, 4): 78.7,
             TreeParams(2, 2, 4): 79.5, TreeParams(3, 1, 3): 70.0}
    assert tune.pick_tree(rates) == TreeParams(3, 1, 4)  # depth 1, 4 nodes; (3,1,3) is 12% slower
    assert tune.pick_tree(rates, tolerance=0.0) == TreeParams(4, 3, 6)  # the fastest alone
    assert tune.pick_tree(rates, tolerance=0.005) == TreeParams(2, 2, 4)
    same_shape_cost = {TreeParams(3, 2, 4): 100.0, TreeParams(2, 2, 4): 99.5}
    assert tune.pick_tree(same_shape_cost) == TreeParams(3, 2, 4)  # equal cost: the faster
    with pytest.raises(ValueError, match="at least one measured tree"):
        tune.pick_tree({})
    with pytest.raises(ValueError, match=r"tolerance must be in \[0, 1\)"):
        tune.pick_tree(rates, tolerance=1.5)


@pytest.mark.parametrize("costs", [{"3,3,8": "fast"}, {"3,3,8": -1.0}, {"3,3,8": True}, ["3,3,8"], None])
def test_a_damaged_round_cost_is_no_pause(tiny_llava_dir, monkeypatch, tmp_path, costs):
    monkeypatch.setenv("MSD_ENGINE_CACHE", str(tmp_path))
    engine = Engine.load(tiny_llava_dir, dtype="float32", max_seq_len=64)
    dtype = engine.model.text.embed_tokens.dtype
    tune.save_tuned(engine.device, engine.config, dtype, TreeParams(3, 3, 8), {TreeParams(3, 3, 8): 1.0}, draft="d",
                    round_costs={TreeParams(3, 3, 8): 1.5})
    assert tune.load_tuned_round_cost(engine.device, engine.config, dtype, "d", TreeParams(3, 3, 8)) == 1.5
    table = json.loads(tune.cache_file().read_text())
    for entries in table.values():
        for entry in entries.values():
            entry["round_cost_plain_steps"] = costs
    tune.cache_file().write_text(json.dumps(table))
    assert tune.load_tuned_round_cost(engine.device, engine.config, dtype, "d", TreeParams(3, 3, 8)) is None
    tune.cache_file().write_text(json.dumps({tune.device_key(engine.device): ["not", "a", "table"]}))
    assert tune.load_tuned_round_cost(engine.device, engine.config, dtype, "d", TreeParams(3, 3, 8)) is None


def test_load_hashes_the_draft_only_when_it_reads_the_tuning_cache(tiny_llava_dir, monkeypatch, tmp_path):
    import msd_engine.engine as engine_module
    from tests.spec_doubles import write_random_draft

    monkeypatch.setenv("MSD_ENGINE_CACHE", str(tmp_path))
    draft = write_random_draft(Engine.load(tiny_llava_dir, dtype="float32"), tmp_path / "draft")
    hashed = []
    real = engine_module.draft_key
    monkeypatch.setattr(engine_module, "draft_key", lambda *a, **k: hashed.append(1) or real(*a, **k))
    tree = TreeParams(2, 2, 4)
    Engine.load(tiny_llava_dir, dtype="float32", max_seq_len=64, draft=draft, tree=tree, pause_below=None)
    Engine.load(tiny_llava_dir, dtype="float32", max_seq_len=64, draft=draft, tree=tree, pause_below=1.5)
    assert hashed == []
    Engine.load(tiny_llava_dir, dtype="float32", max_seq_len=64, draft=draft, tree=tree)  # "auto" reads the cache
    Engine.load(tiny_llava_dir, dtype="float32", max_seq_len=64, draft=draft, pause_below=None)  # so does tree=None
    assert hashed == [1, 1]
