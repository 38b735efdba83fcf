"""Tree acceptance: greedy matching and recursive rejection sampling (exact and Monte Carlo)."""
from __future__ import annotations

from collections import defaultdict

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from msd_engine.spec.accept import accept_greedy, accept_sampling, accept_sampling_with
from msd_engine.spec.tree import DraftTree, build_tree

SETTINGS = settings(max_examples=120, deadline=None)

# The tree of test_spec_tree's hand example: tokens by node, parents by node.
#        0:3
#      /     \
#    1:1     2:2
#   /   \      \
#  3:0  4:3    5:4
#   |
#  6:2
HAND = build_tree(torch.tensor([3, 1, 2, 0, 3, 4, 2]), torch.tensor([-1, 0, 0, 1, 1, 2, 3]))
V = 5


def one_hot_logits(argmax: list[int], vocab: int = V) -> torch.Tensor:
    logits = torch.randn(len(argmax), vocab)
    logits[torch.arange(len(argmax)), torch.tensor(argmax)] = 10.0
    return logits


# ---------------------------------------------------------------- greedy

@pytest.mark.parametrize("argmax, accepted, bonus", [
    ([4, 0, 0, 0, 0, 0, 0], [0], 4),              # no child of the root has token 4
    ([1, 0, 0, 1, 0, 0, 0], [0, 1, 3], 1),        # node 3's only child holds 2, not 1
    ([2, 0, 4, 0, 0, 3, 0], [0, 2, 5], 3),        # down the second branch to a leaf
    ([1, 0, 0, 2, 0, 0, 4], [0, 1, 3, 6], 4),     # the whole deepest path, bonus from the leaf
    ([1, 3, 0, 0, 1, 0, 0], [0, 1, 4], 1),        # second child of node 1
])
def test_greedy_hand(argmax, accepted, bonus):
    assert accept_greedy(HAND, one_hot_logits(argmax)) == (accepted, bonus)


def test_greedy_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"target_logits must be \[T=7, V\]"):
        accept_greedy(HAND, torch.zeros(6, V))


@st.composite
def trees(draw, max_nodes: int = 10, distinct_siblings: bool = True, vocab=None):
    """Random trees; siblings hold distinct tokens (a top-k) unless distinct_siblings=False."""
    vocab = vocab or draw(st.integers(2, 5))
    T = draw(st.integers(1, max_nodes))
    parents, tokens = [-1], [draw(st.integers(0, vocab - 1))]
    kids: dict[int, list[int]] = defaultdict(list)
    for i in range(1, T):
        room = [j for j in range(i) if not distinct_siblings or len(kids[j]) < vocab]
        parent = draw(st.sampled_from(room))
        free = [t for t in range(vocab) if not distinct_siblings or t not in kids[parent]]
        token = draw(st.sampled_from(free))
        kids[parent].append(token)
        parents.append(parent)
        tokens.append(token)
    return build_tree(torch.tensor(tokens), torch.tensor(parents)), vocab


def reference_greedy(tree: DraftTree, logits: torch.Tensor) -> tuple[list[int], int]:
    """Longest prefix of any root-to-leaf path whose tokens equal the argmax at their parent."""
    best = logits.argmax(-1).tolist()
    tokens = tree.tokens.tolist()
    longest: list[int] = [0]
    for row in tree.paths.tolist():
        path = [n for n in row if n >= 0]
        n = 1
        while n < len(path) and tokens[path[n]] == best[path[n - 1]]:
            n += 1
        if n > len(longest):
            longest = path[:n]
    return longest, best[longest[-1]]


@SETTINGS
@given(trees(), st.integers(0, 2**31 - 1))
def test_greedy_is_longest_matching_prefix(case, seed):
    tree, vocab = case
    gen = torch.Generator().manual_seed(seed)
    # small integer logits: matches are frequent and ties exercise "first maximum"
    logits = torch.randint(0, 3, (tree.num_nodes, vocab), generator=gen).float()
    assert accept_greedy(tree, logits) == reference_greedy(tree, logits)


# ---------------------------------------------------------------- sampling: exact enumeration

class Branch:
    """Replays one branch of the sampler's decisions (option indices), extending it with option 0
    at each new decision and queueing the other options for later runs."""

    def __init__(self, script: list[int], queue: list[list[int]]):
        self.script, self.queue, self.taken, self.weight = script, queue, [], 1.0

    def choose(self, options: list[tuple[object, float]]) -> object:
        options = [(v, w) for v, w in options if w > 0]
        if len(self.taken) == len(self.script):
            self.queue.extend(self.taken + [j] for j in range(1, len(options)))
            self.script.append(0)
        pick = self.script[len(self.taken)]
        self.taken.append(pick)
        self.weight *= options[pick][1]
        return options[pick][0]

    def coin(self, prob: torch.Tensor) -> bool:
        return self.choose([(True, float(prob)), (False, 1.0 - float(prob))])

    def draw(self, p: torch.Tensor) -> int:
        return self.choose(list(enumerate(p.tolist())))


def enumerate_outcomes(tree: DraftTree, probs: torch.Tensor) -> dict[tuple[int, ...], float]:
    """Exact distribution of the emitted tokens (accepted tokens then the next token), found by
    running the implementation down every branch of its coins and draws with their weights."""
    dist: dict[tuple[int, ...], float] = defaultdict(float)
    queue: list[list[int]] = [[]]
    while queue:
        branch = Branch(queue.pop(), queue)
        accepted, nxt = accept_sampling_with(tree, probs, branch.coin, branch.draw)
        check_accepted_chain(tree, accepted)
        dist[tuple(tree.tokens[accepted[1:]].tolist()) + (nxt,)] += branch.weight
    return dist


def check_accepted_chain(tree: DraftTree, accepted: list[int]) -> None:
    parents = tree.parents.tolist()
    assert accepted[0] == 0 and all(parents[b] == a for a, b in zip(accepted, accepted[1:]))


def reference_emission(tree: DraftTree, probs: torch.Tensor, seq: tuple[int, ...]) -> float:
    """P(seq) when each token is drawn from the target at the node its prefix reached and the step
    ends once a token leaves the tree (no child holds it) or a leaf's bonus is drawn."""
    tokens, node, prob = tree.tokens.tolist(), 0, 1.0
    for i, x in enumerate(seq):
        prob *= float(probs[node, x])
        child = next((c for c in tree.children[node] if tokens[c] == x), None)
        if (child is None) != (i == len(seq) - 1):
            return 0.0                          # stopped too early or went on past the tree
        node = child
    return prob


def assert_exact(tree: DraftTree, probs: torch.Tensor) -> dict[tuple[int, ...], float]:
    dist = enumerate_outcomes(tree, probs)
    assert sum(dist.values()) == pytest.approx(1.0, abs=1e-6)
    for seq, p in dist.items():
        assert p == pytest.approx(reference_emission(tree, probs, seq), abs=2e-6), seq
    return dist


def first_token_distribution(dist: dict[tuple[int, ...], float], vocab: int) -> torch.Tensor:
    first = torch.zeros(vocab, dtype=torch.float64)
    for seq, p in dist.items():
        first[seq[0]] += p
    return first


def random_probs(T: int, vocab: int, seed: int, zeros: bool = True) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    p = torch.rand(T, vocab, generator=gen) ** 3
    if zeros:  # some tokens impossible, including some drafted ones
        p = p * (torch.rand(T, vocab, generator=gen) > 0.3)
        p[:, 0] += 1e-3                   # keep each row non-empty
    return (p / p.sum(-1, keepdim=True)).float()


def test_exact_hand_tree():
    probs = random_probs(HAND.num_nodes, V, seed=0)
    dist = assert_exact(HAND, probs)
    torch.testing.assert_close(first_token_distribution(dist, V), probs[0].double(), atol=1e-6, rtol=0)


def test_exact_degenerate_rows():
    """p(x) = 1 on a drafted child accepts it surely; p(x) = 0 rejects it surely."""
    probs = torch.zeros(HAND.num_nodes, V)
    probs[0, 1] = 1.0               # root -> node 1 always
    probs[1, 0] = 1.0               # node 1 -> node 3 always
    probs[3, 4] = 1.0               # node 3's child holds 2: rejected, residual gives 4
    probs[2:, 2] += 1.0
    probs[3, 2] = 0.0
    probs = probs / probs.sum(-1, keepdim=True)
    assert dict(assert_exact(HAND, probs)) == pytest.approx({(1, 0, 4): 1.0})


def test_exact_duplicate_siblings_are_offered_once():
    tree = build_tree(torch.tensor([0, 2, 2, 3, 2]), torch.tensor([-1, 0, 0, 0, 2]))
    probs = random_probs(tree.num_nodes, 4, seed=1, zeros=False)
    dist = assert_exact(tree, probs)
    torch.testing.assert_close(first_token_distribution(dist, 4), probs[0].double(), atol=1e-6, rtol=0)


@SETTINGS
@given(trees(max_nodes=8, distinct_siblings=False), st.integers(0, 2**31 - 1), st.booleans())
def test_exact_random_trees(case, seed, zeros):
    tree, vocab = case
    probs = random_probs(tree.num_nodes, vocab, seed, zeros)
    dist = assert_exact(tree, probs)
    torch.testing.assert_close(first_token_distribution(dist, vocab), probs[0].double(),
                               atol=2e-6, rtol=0)


def test_exact_two_token_joint():
    """P(x1, x2) = p(x1) p(x2 | x1): when the step emits only x1, x2 comes from the next step,
    which samples the target at x1 (the same conditional the tree node for x1 carries)."""
    vocab = 6
    gen = torch.Generator().manual_seed(7)
    p1 = torch.softmax(torch.randn(vocab, generator=gen), -1)
    cond = torch.softmax(2 * torch.randn(vocab, vocab, generator=gen), -1)   # [x1, x2]
    # root (token 5) -> children 2, 0, 4; node for 2 -> children 1, 3; node for 0 -> child 5
    tokens = [5, 2, 0, 4, 1, 3, 5]
    tree = build_tree(torch.tensor(tokens), torch.tensor([-1, 0, 0, 0, 1, 1, 2]))
    probs = torch.stack([p1] + [cond[t] for t in tokens[1:]])              # [T, V]
    joint = torch.zeros(vocab, vocab, dtype=torch.float64)
    for seq, w in assert_exact(tree, probs).items():
        if len(seq) >= 2:
            joint[seq[0], seq[1]] += w
        else:
            joint[seq[0]] += w * cond[seq[0]].double()
    torch.testing.assert_close(joint, p1.double()[:, None] * cond.double(), atol=2e-6, rtol=0)


# ---------------------------------------------------------------- sampling: Monte Carlo

def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Goodness-of-fit p-value; cells with zero expected mass must be empty."""
    n = counts.sum()
    live = probs > 0
    assert int(counts[~live].sum()) == 0
    expected = n * probs[live].double()
    stat = ((counts[live].double() - expected) ** 2 / expected).sum()
    dof = torch.tensor(float(live.sum() - 1), dtype=torch.float64)
    return float(torch.special.gammaincc(dof / 2, stat / 2))


def test_monte_carlo_first_token():
    """20k steps of the generator-driven sampler; false-alarm rate of the check: 1e-3."""
    vocab, draws = 6, 20_000
    tree = build_tree(torch.tensor([5, 2, 0, 4, 1, 3]), torch.tensor([-1, 0, 0, 0, 1, 1]))
    probs = random_probs(tree.num_nodes, vocab, seed=3, zeros=False)
    gen = torch.Generator().manual_seed(1234)
    counts = torch.zeros(vocab, dtype=torch.int64)
    for _ in range(draws):
        accepted, nxt = accept_sampling(tree, probs, gen)
        counts[int(tree.tokens[accepted[1]]) if len(accepted) > 1 else nxt] += 1
    assert chi_square_p_value(counts, probs[0]) > 1e-3, (counts, probs[0] * draws)


def test_sampling_seeded_and_checked():
    probs = random_probs(HAND.num_nodes, V, seed=5)
    runs = [[accept_sampling(HAND, probs, g) for _ in range(20)]
            for g in (torch.Generator().manual_seed(9), torch.Generator().manual_seed(9))]
    assert runs[0] == runs[1]
    for accepted, _ in runs[0]:
        check_accepted_chain(HAND, accepted)
    with pytest.raises(ValueError, match="target_probs must be"):
        accept_sampling(HAND, probs[:3], torch.Generator())
