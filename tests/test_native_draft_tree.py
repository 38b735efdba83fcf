"""msd_draft_tree_cpu (native_draft.draft_tree): the whole drafting step in one call builds the tree
the drafter's Python loop builds from the per-call kernels, node for node, and writes the same
scratch KV; the CPU backend routes drafting through it; bad arguments are named."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from msd_engine import Engine, native
from msd_engine.draft.init import draft_config_for, init_draft_weights
from msd_engine.convert.msd_draft import save_draft
from msd_engine.native_draft import DraftHeadWeights, draft_extend, draft_tree
from msd_engine.native_decoder import DecoderLayerWeights
from msd_engine.spec.tree import TreeParams

pytestmark = pytest.mark.skipif(not native.is_built(), reason="msd_engine._C is not built")

TREES = [TreeParams(1, 1, 2), TreeParams(4, 1, 6), TreeParams(4, 3, 12), TreeParams(10, 5, 60), TreeParams(3, 6, 30),
         TreeParams(16, 2, 200)]


def write_draft(target: Engine, directory, mode: str, draft_vocab: int, seed: int, std: float = 0.5):
    """A random draft; with draft_vocab, over that many scattered target ids. std 0.5 gives peaked
    draft distributions, so the ranking is decided by real differences as well as near-ties."""
    config = draft_config_for(target.config, mode, draft_vocab_size=draft_vocab)
    vocab = target.config.text.vocab_size
    ids = torch.randperm(vocab, generator=torch.Generator().manual_seed(seed))[:draft_vocab].sort().values \
        if draft_vocab else None
    save_draft(directory, config, init_draft_weights(config, target.model.text.embed_tokens, seed, std, ids),
               force=True)
    return directory


@pytest.fixture(scope="module")
def engines(tiny_llava_dir, tmp_path_factory):
    """(draft dtype, mode, reduced vocab) -> an engine whose drafter has a committed prefix."""
    made = {}
    target = Engine.load(tiny_llava_dir, dtype="float32", max_seq_len=192)

    def get(draft_dtype: str, mode: str, draft_vocab: int) -> Engine:
        key = (draft_dtype, mode, draft_vocab)
        if key not in made:
            # float16's range: std 0.5 overflows the random layer there
            std = 0.1 if draft_dtype == "float16" else 0.5
            path = write_draft(target, tmp_path_factory.mktemp("draft") / mode, mode, draft_vocab, len(made), std)
            engine = Engine.load(tiny_llava_dir, dtype="float32", max_seq_len=192, draft=path,
                                 tree=TreeParams(16, 6, 60), draft_dtype=draft_dtype)
            engine.config = dataclasses.replace(engine.config, eos_token_ids=())
            engine.generate(input_ids=[1, 5, 9, 200, 31], max_new_tokens=12)  # prefill + a few rounds
            made[key] = engine
        return made[key]
    return get


class Counting:
    """The drafter's native head, counting the steps it takes (so a comparison cannot pass by
    running the Python path twice)."""

    def __init__(self, native):
        self.native, self.trees, self.extends = native, 0, 0

    def tree(self, *args):
        out = self.native.tree(*args)
        self.trees += out is not None
        return out

    def extend(self, *args):
        out = self.native.extend(*args)
        self.extends += out is not None
        return out


def draft_both_ways(drafter, root: int, params: TreeParams):
    """(tree, scratch KV) from the Python loop, then from the native step, same start state."""
    native, out = drafter.native, []
    counting = Counting(native)
    committed = drafter.cache.length
    scratch = slice(committed, committed + params.depth * params.top_k)
    for step in (None, counting):
        drafter.native = step
        drafter.cache.arena[:, :, :, scratch] = float("nan")
        with torch.inference_mode():
            tree = drafter.draft(root, params)
        out.append((tree, drafter.cache.arena[:, :, :, scratch].clone()))
    drafter.native = native
    assert drafter.cache.length == committed and counting.trees == 1
    return out


def commit_tokens(drafter, m: int, seed: int) -> None:
    """Advance the drafter by m random text tokens (Python path)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, drafter.model.embed_tokens.shape[0], (m,), generator=g)
    native, drafter.native = drafter.native, None
    with torch.inference_mode():
        drafter.extend(tokens, None, None, torch.randn(m, drafter.model.embed_tokens.shape[1], generator=g))
    drafter.native = native


@pytest.mark.parametrize("tree", TREES, ids=str)
@pytest.mark.parametrize("draft_dtype, mode, draft_vocab", [("float32", "msd", 0), ("bfloat16", "eagle", 0),
                                                            ("bfloat16", "msd", 700), ("float16", "msd", 300)])
def test_native_step_builds_the_python_loops_tree(engines, tree, draft_dtype, mode, draft_vocab):
    drafter = engines(draft_dtype, mode, draft_vocab).drafter
    assert drafter.native is not None
    start = drafter.cache.length
    for step, root in enumerate((3, 1000, 31999)):  # three prefix lengths, across a 32-slot word
        if step:
            commit_tokens(drafter, 11, seed=step)
        (want, want_kv), (got, got_kv) = draft_both_ways(drafter, root, tree)
        assert got.tokens.tolist() == want.tokens.tolist()
        assert got.parents.tolist() == want.parents.tolist()
        assert torch.equal(got.depths, want.depths) and torch.equal(got.mask, want.mask)
        assert torch.equal(got.paths, want.paths)
        assert got.num_nodes == min(tree.total_tokens, tree.max_nodes)
        # the same scratch KV, bit for bit (NaN-filled first: every written slot is compared)
        assert torch.equal(got_kv.isnan(), want_kv.isnan()) and torch.equal(got_kv.nan_to_num(), want_kv.nan_to_num())
    drafter.cache.length = start


def test_ties_and_nan_scores_go_the_same_way(engines):
    """A zero lm_head ties every candidate (the ranking is then creation order, column order within
    a row); NaN draft scores make both paths refuse the same way (a child would be kept without its
    parent)."""
    drafter = engines("float32", "msd", 0).drafter
    model = drafter.model
    lm_head, fc_bias = model.lm_head.clone(), model.fc_bias.clone()
    try:
        model.lm_head.zero_()  # in place: the native head reads the same memory
        for params in (TreeParams(4, 3, 12), TreeParams(10, 2, 40)):
            (want, _), (got, _) = draft_both_ways(drafter, 9, params)
            assert got.tokens.tolist() == want.tokens.tolist() and got.parents.tolist() == want.parents.tolist()
            assert got.tokens[1:params.top_k + 1].tolist() == list(range(params.top_k))
        model.lm_head.copy_(lm_head)
        model.fc_bias.fill_(float("nan"))
        for native in (None, drafter.native):
            saved, drafter.native = drafter.native, native
            try:
                with pytest.raises(ValueError, match="without its parent"), torch.inference_mode():
                    drafter.draft(9, TreeParams(4, 1, 6))
            finally:
                drafter.native = saved
    finally:
        model.lm_head.copy_(lm_head)
        model.fc_bias.copy_(fc_bias)


@pytest.mark.parametrize("m", [1, 2, 5, 16])
@pytest.mark.parametrize("draft_dtype, mode, draft_vocab", [("float32", "msd", 0), ("bfloat16", "eagle", 700)])
def test_native_extend_commits_what_the_python_path_commits(engines, m, draft_dtype, mode, draft_vocab):
    """Same hidden rows, same KV slots, same cache length and last hidden; float32 target features
    over a bfloat16 draft are converted as the Python path converts them."""
    drafter = engines(draft_dtype, mode, draft_vocab).drafter
    g = torch.Generator().manual_seed(m)
    tokens = torch.randint(0, drafter.model.embed_tokens.shape[0], (m,), generator=g)
    features = torch.randn(m, drafter.model.embed_tokens.shape[1], generator=g)  # the float32 target's
    committed = drafter.cache.length
    native, got = drafter.native, []
    counting = Counting(native)
    for step in (None, counting):
        drafter.native = step
        drafter.cache.length = committed
        drafter.cache.arena[:, :, :, committed:committed + m] = float("nan")
        with torch.inference_mode():
            hidden = drafter.extend(tokens, None, None, features)
        got.append((hidden, drafter.last_hidden.clone(), drafter.cache.length,
                    drafter.cache.arena[:, :, :, committed:committed + m].clone()))
    drafter.native = native
    drafter.cache.length = committed
    assert counting.extends == 1
    (want_h, want_last, want_len, want_kv), (got_h, got_last, got_len, got_kv) = got
    assert torch.equal(got_h, want_h) and torch.equal(got_last, want_last) and got_len == want_len == committed + m
    assert not got_kv.isnan().any() and torch.equal(got_kv, want_kv)


def test_every_simd_path_builds_the_same_tree_as_its_loop(engines):
    drafter = engines("bfloat16", "msd", 700).drafter
    try:
        for isa in native.CPU_ISAS:
            try:
                native.set_cpu_isa(isa)
            except (RuntimeError, ValueError):
                continue
            (want, _), (got, _) = draft_both_ways(drafter, 77, TreeParams(4, 3, 12))
            assert got.tokens.tolist() == want.tokens.tolist() and got.parents.tolist() == want.parents.tolist()
    finally:
        native.set_cpu_isa(None)


def test_backends_and_wide_levels_take_the_loop(tiny_llava_dir, engines, monkeypatch, tmp_path):
    engine = engines("float32", "msd", 0)
    drafter = engine.drafter
    calls = []
    monkeypatch.setattr("msd_engine.ops.cpu_ops.draft_tree", lambda *a: calls.append(a) or draft_tree(*a))
    drafter.native = drafter.model.ops.native_draft_head(drafter.model, drafter.cache)
    with torch.inference_mode():
        drafter.draft(5, TreeParams(4, 2, 10))
        assert len(calls) == 1
        wide = drafter.draft(5, TreeParams(17, 1, 40))  # levels wider than 16 rows: the per-level loop
    assert len(calls) == 1 and wide.num_nodes == 40
    torch_engine = Engine.load(tiny_llava_dir, dtype="float32", max_seq_len=64, backend="torch",
                               draft=write_draft(engine, tmp_path / "msd", "msd", 0, seed=9))
    assert torch_engine.drafter.native is None


@pytest.fixture
def head(engines):
    drafter = engines("float32", "msd", 0).drafter
    model = drafter.model
    parts = dict(layer=model.block.native, embed=model.embed_tokens, fc_weight=model.fc_weight,
                 fc_bias=model.fc_bias, lm_head=model.lm_head, vocab_ids=model.vocab_ids, cos=model.cos,
                 sin=model.sin, k_cache=drafter.cache.keys[0], v_cache=drafter.cache.values[0])
    return parts, drafter


def test_head_argument_errors(head):
    parts, drafter = head
    layer = parts["layer"]
    normed = DecoderLayerWeights(*layer.tensors[:5], layer.tensors[2], num_heads=drafter.model.config.num_heads,
                                 num_kv_heads=layer.num_kv_heads, head_dim=layer.head_dim, rms_norm_eps=1e-5)
    bad_ids = torch.arange(parts["lm_head"].shape[0] - 1, -1, -1, dtype=torch.int64) + 5
    cases = [({"layer": normed}, ValueError, "no next_norm"),
             ({"layer": "layer"}, TypeError, "DecoderLayerWeights"),
             ({"fc_weight": parts["fc_weight"].t()}, ValueError, "fc_weight has shape"),
             ({"lm_head": parts["lm_head"][:100]}, ValueError, "pass the rows' vocab_ids"),
             ({"vocab_ids": bad_ids}, ValueError, r"vocab_ids must lie in \[0, "),
             ({"cos": parts["cos"].double()}, TypeError, "cos is torch.float64"),
             ({"k_cache": parts["k_cache"][:, :, :4]}, ValueError, "k_cache has shape"),
             ({"v_cache": parts["v_cache"].double()}, TypeError, "v_cache must be a torch.float32")]
    for change, error, match in cases:
        with pytest.raises(error, match=match):
            DraftHeadWeights(**{**parts, **change})


def test_step_argument_errors(head):
    parts, drafter = head
    weights = DraftHeadWeights(**parts)
    hidden = drafter.last_hidden.contiguous()
    slots = weights.num_slots
    with pytest.raises(ValueError, match="last_hidden must be a contiguous torch.float32"):
        draft_tree(weights, hidden[:-1], 10, 3, 4, 2, 10)
    with pytest.raises(ValueError, match="top_k must be <= 16"):
        draft_tree(weights, hidden, 10, 3, 17, 1, 10)
    with pytest.raises(TypeError, match="depth must be an int"):
        draft_tree(weights, hidden, 10, 3, 4, 2.0, 10)
    with pytest.raises(ValueError, match=r"committed \(\d+\) \+ depth \(2\) x top_k \(4\) scratch slots exceed"):
        draft_tree(weights, hidden, slots - 7, 3, 4, 2, 10)
    with pytest.raises(ValueError, match=r"draft_extend commits 1..16 tokens, got 17"):
        draft_extend(weights, torch.zeros(17, dtype=torch.int64), torch.zeros(17, weights.hidden), 10)
    with pytest.raises(ValueError, match=r"features must be torch.float32 CPU \[2, "):
        draft_extend(weights, torch.zeros(2, dtype=torch.int64), torch.zeros(3, weights.hidden), 10)
    with pytest.raises(ValueError, match=r"token_ids\[1\] = -4 is outside \[0, vocab_size"):
        draft_extend(weights, torch.tensor([3, -4]), torch.zeros(2, weights.hidden), 10)
    with pytest.raises(ValueError, match=r"committed \(\d+\) \+ num_tokens \(2\) exceeds num_slots"):
        draft_extend(weights, torch.tensor([3, 4]), torch.zeros(2, weights.hidden), slots - 1)
    lib = native._lib()
    out = torch.empty(3, dtype=torch.int64)
    with pytest.raises(ValueError, match="tokens is a null pointer"):
        lib.draft_tree_cpu(weights.head, hidden.data_ptr(), 10, 3, 1, 1, 3, 0, out.data_ptr(), out.data_ptr(), 0)
    bad = dict(layer=parts["layer"].layer, embed=parts["embed"].data_ptr(), vocab=parts["embed"].shape[0],
               fc=parts["fc_weight"].data_ptr(), bias=parts["fc_bias"].data_ptr(), lm_head=parts["lm_head"].data_ptr(),
               ids=0, draft_vocab=parts["lm_head"].shape[0], cos=parts["cos"].data_ptr(), sin=parts["sin"].data_ptr(),
               positions=parts["cos"].shape[0], k=parts["k_cache"].data_ptr(), v=parts["v_cache"].data_ptr(),
               slots=slots, head_stride=weights.num_slots * parts["k_cache"].shape[2],
               slot_stride=parts["k_cache"].shape[2], dtype=weights.code)
    for change, match in [({"draft_vocab": bad["vocab"] + 1}, r"head->draft_vocab \(\d+\) exceeds head->vocab_size"),
                          ({"slot_stride": 3}, "head->cache_slot_stride"), ({"k": 0}, "head->k_cache is a null"),
                          ({"dtype": 7}, "dtype 7 is not one of MSD_FLOAT32")]:
        head = lib.DraftHead(*{**bad, **change}.values())
        with pytest.raises(ValueError, match=match):
            lib.draft_tree_cpu(head, hidden.data_ptr(), 10, 3, 2, 1, 3, out.data_ptr(), out.data_ptr(),
                               out.data_ptr(), 0)
    with pytest.raises(ValueError, match=r"or committed \+ depth exceeds max_positions"):
        draft_tree(weights, hidden, parts["cos"].shape[0] - 1, 3, 1, 2, 3)
    with pytest.raises(ValueError, match=r"top_k must be in \[1, min\(16"):
        lib.draft_tree_cpu(weights.head, hidden.data_ptr(), 10, 3, 0, 1, 3, out.data_ptr(), out.data_ptr(),
                           out.data_ptr(), 0)
