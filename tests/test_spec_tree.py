"""EAGLE-2 tree drafting (model-free): expansion, selection and the plan tensors."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from msd_engine.spec.tree import (DraftTree, TreeCandidates, TreeParams, build_tree, expand_frontier,
                                  root_level, select_tree)

SETTINGS = settings(max_examples=150, deadline=None)


# ---------------------------------------------------------------- plain references

def ancestors_of(parents: list[int], i: int) -> list[int]:
    """i and its ancestors, leaf first."""
    chain = [i]
    while parents[chain[-1]] >= 0:
        chain.append(parents[chain[-1]])
    return chain


def check_tree_invariants(tree: DraftTree) -> None:
    T = tree.num_nodes
    parents = tree.parents.tolist()
    for t in (tree.tokens, tree.parents, tree.depths, tree.paths):
        assert t.dtype == torch.int64
    assert tree.tokens.shape == tree.parents.shape == tree.depths.shape == (T,)
    assert parents[0] == -1 and all(0 <= parents[i] < i for i in range(1, T))
    mask = [[False] * T for _ in range(T)]
    for i in range(T):
        for a in ancestors_of(parents, i):
            mask[i][a] = True
    assert tree.mask.dtype == torch.bool and tree.mask.tolist() == mask
    assert tree.depths.tolist() == [len(ancestors_of(parents, i)) - 1 for i in range(T)]
    leaves = [i for i in range(T) if i not in parents]
    max_depth = max(tree.depths.tolist())
    assert tree.paths.shape == (len(leaves), max_depth + 1)
    rows = tree.paths.tolist()
    ends = []
    for row in rows:
        used = [n for n in row if n >= 0]
        assert row == used + [-1] * (len(row) - len(used)), "padding must be on the right"
        assert used == ancestors_of(parents, used[-1])[::-1], "not a root-to-leaf chain"
        ends.append(used[-1])
    assert sorted(ends) == leaves, "each leaf must end exactly one path"


def reference_selection(scores: list[float], n: int) -> list[int]:
    """Top-n candidate ids by score, ties to the earlier id, returned in creation order."""
    return sorted(sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:n])


# ---------------------------------------------------------------- TreeParams

def test_params_defaults_and_bounds():
    assert TreeParams() == TreeParams(top_k=10, depth=5, total_tokens=60)
    assert TreeParams().max_nodes == 1 + 10 + 5 * 100
    TreeParams(top_k=2, depth=1, total_tokens=7)  # exactly every candidate + root
    with pytest.raises(ValueError, match="total_tokens=8.*top_k=2, depth=1"):
        TreeParams(top_k=2, depth=1, total_tokens=8)
    for bad in (dict(top_k=0), dict(depth=0), dict(total_tokens=0), dict(top_k=-3)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            TreeParams(**bad)
    with pytest.raises(TypeError, match="top_k"):
        TreeParams(top_k=2.0)


# ---------------------------------------------------------------- a hand-computed tree
# V = 5, top_k = 2, depth = 2. Probabilities chosen so no two cumulative scores tie.
ROOT_P = [0.05, 0.5, 0.3, 0.1, 0.05]
LEVEL1_P = [[0.56, 0.1, 0.14, 0.15, 0.05],    # after token 1 (candidate 0)
            [0.1, 0.2, 0.1, 0.1, 0.5]]        # after token 2 (candidate 1)
LEVEL2_P = [[0.1, 0.15, 0.65, 0.05, 0.05],    # after candidate 2 (tokens 1, 0)
            [0.25, 0.2, 0.06, 0.44, 0.05]]    # after candidate 4 (tokens 2, 4)


def draft_hand_tree() -> TreeCandidates:
    log = lambda p: torch.tensor(p, dtype=torch.float64).log().float()  # noqa: E731
    cands = TreeCandidates()
    tokens, scores = root_level(log(ROOT_P), 2)
    assert tokens.tolist() == [1, 2]
    torch.testing.assert_close(scores, log([0.5, 0.3]))
    ids = torch.arange(2) + cands.add_level(tokens, scores, torch.tensor([-1, -1]))
    for probs, want_tokens, want_next in ((LEVEL1_P, [0, 3, 4, 1], [0, 2]),
                                          (LEVEL2_P, [2, 1, 3, 0], [0, 2])):
        tokens, child_scores, slot, nxt = expand_frontier(scores, log(probs), 2)
        assert tokens.tolist() == want_tokens and slot.tolist() == [0, 0, 1, 1]
        assert nxt.tolist() == want_next
        first = cands.add_level(tokens, child_scores, ids[slot])
        ids, scores = first + nxt, child_scores[nxt]
    return cands


def test_hand_candidates():
    cands = draft_hand_tree()
    tokens, scores, parents = cands.lists()
    assert cands.num_candidates == 10 and cands.num_levels == 3
    assert tokens == [1, 2, 0, 3, 4, 1, 2, 1, 3, 0]
    assert parents == [-1, -1, 0, 0, 1, 1, 2, 2, 4, 4]
    want = [0.5, 0.3, 0.28, 0.075, 0.15, 0.06, 0.182, 0.042, 0.066, 0.0375]
    torch.testing.assert_close(torch.tensor(scores).exp(), torch.tensor(want), rtol=1e-5, atol=0)


def test_hand_select_tree():
    tree = select_tree(3, draft_hand_tree(), total_tokens=7)
    # kept: candidates 0, 1, 2, 3, 4, 6 (scores .5 .3 .28 .075 .15 .182); dropped .066 and below
    assert tree.num_nodes == 7
    assert tree.tokens.tolist() == [3, 1, 2, 0, 3, 4, 2]
    assert tree.parents.tolist() == [-1, 0, 0, 1, 1, 2, 3]
    assert tree.depths.tolist() == [0, 1, 1, 2, 2, 2, 3]
    assert tree.paths.tolist() == [[0, 1, 4, -1], [0, 2, 5, -1], [0, 1, 3, 6]]
    rows = [[0], [0, 1], [0, 2], [0, 1, 3], [0, 1, 4], [0, 2, 5], [0, 1, 3, 6]]
    want_mask = torch.zeros(7, 7, dtype=torch.bool)
    for i, row in enumerate(rows):
        want_mask[i, row] = True
    assert torch.equal(tree.mask, want_mask)
    assert tree.children == ((1, 2), (3, 4), (5,), (6,), (), (), ())
    check_tree_invariants(tree)


def test_hand_select_all_and_root_only():
    everything = select_tree(3, draft_hand_tree(), total_tokens=100)  # fewer candidates: take all
    assert everything.num_nodes == 11
    assert everything.parents.tolist() == [-1, 0, 0, 1, 1, 2, 2, 3, 3, 5, 5]
    check_tree_invariants(everything)
    root = select_tree(9, draft_hand_tree(), total_tokens=1)
    assert root.tokens.tolist() == [9] and root.parents.tolist() == [-1]
    assert root.depths.tolist() == [0] and root.paths.tolist() == [[0]]
    assert root.mask.tolist() == [[True]]
    empty = select_tree(9, TreeCandidates(), total_tokens=60)
    assert empty.tokens.tolist() == [9] and empty.paths.tolist() == [[0]]


def test_ties_go_to_the_earlier_candidate():
    cands = TreeCandidates()
    cands.add_level(torch.tensor([5, 6, 7]), torch.tensor([-1.0, -1.0, -1.0]), torch.tensor([-1, -1, -1]))
    # zero log-prob children tie with their parents and with the other level-0 nodes
    cands.add_level(torch.tensor([8, 9]), torch.tensor([-1.0, -1.0]), torch.tensor([2, 0]))
    tree = select_tree(0, cands, total_tokens=4)
    assert tree.tokens.tolist() == [0, 5, 6, 7]
    tree = select_tree(0, cands, total_tokens=5)
    assert tree.tokens.tolist() == [0, 5, 6, 7, 8] and tree.parents.tolist() == [-1, 0, 0, 0, 3]


def test_candidate_and_tree_errors():
    cands = TreeCandidates()
    with pytest.raises(ValueError, match="parents must have shape"):
        cands.add_level(torch.tensor([1, 2]), torch.zeros(2), torch.tensor([-1]))
    with pytest.raises(TypeError, match="int64"):
        cands.add_level(torch.tensor([1, 2], dtype=torch.int32), torch.zeros(2), torch.tensor([-1, -1]))
    cands.add_level(torch.tensor([1, 2]), torch.tensor([-1.0, -2.0]), torch.tensor([-1, -1]))
    cands.add_level(torch.tensor([3]), torch.tensor([-3.0]), torch.tensor([2]))  # own level
    with pytest.raises(ValueError, match="candidate 2 has parent 2"):
        select_tree(0, cands, total_tokens=4)
    with pytest.raises(ValueError, match="total_tokens"):
        select_tree(0, TreeCandidates(), total_tokens=0)
    with pytest.raises(ValueError, match="top_k"):
        root_level(torch.zeros(4), 5)
    with pytest.raises(ValueError, match="parents must be -1"):
        build_tree(torch.tensor([1, 2, 3]), torch.tensor([-1, 2, 0]))


# ---------------------------------------------------------------- properties

@st.composite
def candidate_levels(draw):
    """Random levels: parents from earlier levels (or the root), child score = parent + lp <= 0;
    log-probs come from a small set so ties between scores are common."""
    lp = st.one_of(st.sampled_from([0.0, -0.5, -1.0, -2.0]), st.floats(-6.0, 0.0, width=32))
    levels, scores, n_before = [], [], 0
    for level in range(draw(st.integers(1, 5))):
        n = draw(st.integers(1, 8))
        parents = [draw(st.integers(-1, n_before - 1)) if level else -1 for _ in range(n)]
        base = torch.tensor([scores[p] if p >= 0 else 0.0 for p in parents], dtype=torch.float32)
        new = base + torch.tensor([draw(lp) for _ in range(n)], dtype=torch.float32)
        tokens = [draw(st.integers(0, 50)) for _ in range(n)]
        levels.append((tokens, new, parents))
        scores += new.tolist()
        n_before += n
    return levels, draw(st.integers(1, n_before + 3)), draw(st.integers(0, 50))


@SETTINGS
@given(candidate_levels())
def test_select_tree_matches_reference(case):
    levels, total_tokens, root_token = case
    cands = TreeCandidates()
    for tokens, scores, parents in levels:
        cands.add_level(torch.tensor(tokens), scores, torch.tensor(parents))
    tree = select_tree(root_token, cands, total_tokens)
    check_tree_invariants(tree)
    all_tokens, all_scores, all_parents = cands.lists()
    keep = reference_selection(all_scores, total_tokens - 1)
    assert tree.tokens.tolist() == [root_token] + [all_tokens[c] for c in keep]
    tree_id = {c: i + 1 for i, c in enumerate(keep)} | {-1: 0}
    assert tree.parents.tolist() == [-1] + [tree_id[all_parents[c]] for c in keep]


@st.composite
def drafting_runs(draw):
    k = draw(st.integers(1, 4))
    depth = draw(st.integers(1, 3))
    vocab = draw(st.integers(k, 9))
    params = TreeParams(top_k=k, depth=depth, total_tokens=draw(st.integers(1, 1 + k + depth * k * k)))
    return params, vocab, draw(st.integers(0, 2**31 - 1))


def reference_children(frontier: list[float], logprobs: list[list[float]], k: int):
    """(score, token, frontier slot) of each node's top-k children, in creation order."""
    children = []
    for slot, (score, row) in enumerate(zip(frontier, logprobs)):
        best = sorted(range(len(row)), key=lambda t: (-row[t], t))[:k]
        children += [(score + row[t], t, slot) for t in best]
    return children


@SETTINGS
@given(drafting_runs())
def test_eagle2_drafting_loop(run):
    """The loop the engine runs, on random draft distributions, against plain references."""
    params, vocab, seed = run
    gen = torch.Generator().manual_seed(seed)
    logprobs = lambda *shape: torch.log_softmax(3 * torch.randn(*shape, generator=gen), -1)  # noqa: E731
    cands = TreeCandidates()
    tokens, scores = root_level(logprobs(vocab), params.top_k)
    ids = cands.add_level(tokens, scores, torch.full((params.top_k,), -1)) + torch.arange(params.top_k)
    for _ in range(params.depth):
        child_lp = logprobs(params.top_k, vocab)
        tokens, child_scores, slot, nxt = expand_frontier(scores, child_lp, params.top_k)
        children = reference_children(scores.tolist(), child_lp.tolist(), params.top_k)
        assert tokens.tolist() == [c[1] for c in children] and slot.tolist() == [c[2] for c in children]
        for got, want in zip(child_scores.tolist(), children):
            assert math.isclose(got, want[0], rel_tol=1e-6, abs_tol=1e-6)
        # the frontier is ranked on the float32 scores themselves (stable: ties to the earlier)
        ranked = sorted(range(len(children)), key=lambda i: (-child_scores[i].item(), i))
        assert nxt.tolist() == ranked[:params.top_k]
        ids, scores = cands.add_level(tokens, child_scores, ids[slot]) + nxt, child_scores[nxt]
    tree = select_tree(7, cands, params.total_tokens)
    check_tree_invariants(tree)
    assert tree.num_nodes == params.total_tokens
    all_tokens, all_scores, _ = cands.lists()
    keep = reference_selection(all_scores, params.total_tokens - 1)
    assert tree.tokens[1:].tolist() == [all_tokens[c] for c in keep]


@SETTINGS
@given(st.data())
def test_build_tree_invariants(data):
    T = data.draw(st.integers(1, 20))
    parents = [-1] + [data.draw(st.integers(0, i - 1)) for i in range(1, T)]
    tree = build_tree(torch.randint(0, 9, (T,)), torch.tensor(parents))
    check_tree_invariants(tree)
