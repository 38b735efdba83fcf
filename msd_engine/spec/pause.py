"""When speculation steps aside: plain steps while the draft's recent rounds do not pay for themselves.

A round costs `break_even` plain steps (its draft and its verify of the whole tree, measured by the
tuner on this device); it pays when it emits more tokens than that. Where the draft keeps missing
(sampling at temperature 1 with drafts trained on greedy answers, a subject the draft never saw) a
CPU's round can cost more than the tokens it emits, and speculative decoding runs slower than plain
decoding. The policy watches a moving average of tokens per round and, when it falls clearly under
`break_even` (under `pause_under` x `break_even`), takes plain steps for a while. When the pause
ends, the draft commits the paused tokens (as it must before its next round anyway) and looks back:
its guesses for each of those tokens, made from what came before it, say how many tokens rounds
would have emitted over the stretch (`hindsight_rounds`). Those estimates join the average; if it is
still under the threshold the next pause starts, twice as long (up to `longest_pause`), else rounds
resume. So a pause ends once the draft would have paid again, judged from every paused token
rather than from one trial round, as an earlier version did: a trial cost a round and, by bad luck,
often emitted one token. On one held-out greedy prompt (demo pair, float32 target, tree (2,2,4)) the
draft recovered during the first pause, a failed trial doubled the pause to the end of the answer,
and the request ran at 0.67x the speed of speculating every step. Over all 75 held-out prompts,
greedy, with speed modelled from counts (tokens over rounds x 1.33 + plain steps, which a noisy
machine cannot blur), five prompts paused: the worst ran 0.76x speculating every step with trials
and 0.81x with hindsight, the mean over prompts 0.995x and 0.998x. At temperature 1 the two came out
alike: image prompts 0.98x and 0.97x plain decoding, text 1.07x and 1.06x, against 0.90x and 1.05x
speculating every step (`/work`-only script).

Why a margin and a slow average: a pause has costs of its own (the draft commits the paused steps'
tokens in one extend, and looks back with an lm_head over them), and acceptance swings from round to
round. With trial rounds (session 16: bfloat16 target, tree (3,1,4), 10 held-out prompts,
break-even taken as 1.68 plain steps; the same script measured a round at 1.62-1.69), pausing at
the break-even itself, with the newest round weighted 0.25 and pauses allowed from the third round,
took 30% of the greedy tokens by plain steps and ran 1.12x plain against 1.23x without pausing;
weighting 0.1, from the eighth round, at 0.9 of the break-even, it ran 1.31x against 1.31x greedy
and 0.96x against 0.86x at temperature 1 (`/work`-only script, one run each; this machine's
run-to-run noise is ~10%).

Decisions depend only on tokens (accepted lengths, the draft's guesses), never on clocks, so a
seeded request gives the same tokens on every run. Output is the target's either way: a plain step
is one target forward and one sample (greedy: the argmax), exactly as plain decoding takes it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence


@dataclass(frozen=True)
class PausePolicy:
    break_even: float        # tokens per round at which a round costs what plain steps would
    pause_under: float = 0.9  # a pause starts when the average falls under this fraction of break_even
    smoothing: float = 0.1   # weight of the newest round in the moving average
    first_rounds: int = 8    # rounds observed before the first pause may start
    first_pause: int = 8     # plain steps in the first pause after rounds that paid
    longest_pause: int = 64  # a pause doubles while hindsight says rounds would still not pay, up to this

    def __post_init__(self) -> None:
        if not (isinstance(self.break_even, (int, float)) and not isinstance(self.break_even, bool)
                and math.isfinite(self.break_even)
                and self.break_even >= 1.0):
            raise ValueError(f"PausePolicy.break_even must be a finite number >= 1 (tokens per round), "
                             f"got {self.break_even!r}")
        if not 0.0 < self.pause_under <= 1.0:
            raise ValueError(f"PausePolicy.pause_under must be in (0, 1], got {self.pause_under!r}")
        if not 0.0 < self.smoothing <= 1.0:
            raise ValueError(f"PausePolicy.smoothing must be in (0, 1], got {self.smoothing!r}")
        for name in ("first_rounds", "first_pause", "longest_pause"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"PausePolicy.{name} must be an int >= 1, got {value!r}")
        if self.longest_pause < self.first_pause:
            raise ValueError(f"PausePolicy.longest_pause ({self.longest_pause}) must be >= first_pause "
                             f"({self.first_pause})")


class PauseState:
    """One request's run of a `PausePolicy` (None: speculate every step)."""

    def __init__(self, policy: Optional[PausePolicy]):
        self.policy = policy
        self.mean: Optional[float] = None  # moving average of tokens per round
        self.rounds = 0
        self.steps_left = 0                # plain steps left in the current pause
        self.next_pause = policy.first_pause if policy else 0

    def speculate(self) -> bool:
        """Whether the next step is a speculative round (else a plain step, counted off the pause)."""
        if self.steps_left > 0:
            self.steps_left -= 1
            return False
        return True

    def observe(self, emitted: int) -> None:
        """Record a round that emitted `emitted` tokens (the bonus counted); may start a pause."""
        if self.policy is None:
            return
        self.rounds += 1
        self._average(emitted)
        if self.rounds >= self.policy.first_rounds:
            self._pause_if_not_paying(steps_taken_now=0)

    def review(self, rounds: Sequence[int]) -> bool:
        """At a pause's end: fold the tokens per round that rounds would have emitted over the paused
        stretch (`hindsight_rounds`) into the average. True: speculate now. False: the next pause,
        twice as long, has started, and the step about to be taken is its first plain step."""
        assert self.policy is not None, "review() follows a pause, and only a policy pauses"
        for emitted in rounds:
            self._average(emitted)
        return not self._pause_if_not_paying(steps_taken_now=1)

    def _average(self, emitted: int) -> None:
        p = self.policy
        self.mean = float(emitted) if self.mean is None else self.mean + p.smoothing * (emitted - self.mean)

    def _pause_if_not_paying(self, steps_taken_now: int) -> bool:
        """Start the next pause (less the steps the caller takes now) if the average is under the
        threshold, doubling the one after; else the next pause is short again. Returns whether it paused."""
        p = self.policy
        if self.mean is not None and self.mean < p.pause_under * p.break_even:
            self.steps_left = self.next_pause - steps_taken_now
            self.next_pause = min(2 * self.next_pause, p.longest_pause)
            return True
        self.next_pause = p.first_pause
        return False

def hindsight_rounds(tokens: Sequence[int], guesses: Sequence[Sequence[int]], longest: int) -> list[int]:
    """Tokens per round that speculative rounds would have emitted over `tokens` (what plain steps
    emitted, in order), from the draft's guesses for each token: `guesses[i]` are its k best for
    tokens[i], best first, made from the positions before it.

    A round accepts its first token when it is among the k guesses, each later token when it is the
    best guess, up to `longest` tokens (what the tree's depth and size allow), and emits them plus the
    next token (the bonus). For sampling the first test is right in law: rejection sampling accepts one
    of k distinct children with exactly the probability that the target's sample is among them. It is
    an estimate all the same: a small tree may leave out a child that deeper guesses outrank, deeper
    tokens are judged from guesses made with the target's features (which a round's deeper levels
    lack) and along one path where a tree may hold a few. A round cut off by the stretch's end counts
    its accepted tokens plus one (a lower bound) when it accepted any; else it is left out."""
    if len(guesses) != len(tokens):
        raise ValueError(f"hindsight_rounds needs one row of guesses per token, got {len(guesses)} "
                         f"for {len(tokens)}")
    if longest < 0:
        raise ValueError(f"longest must be >= 0, got {longest}")

    def accepted_at(j: int, first: bool) -> bool:  # a round's first token: any of the k; later: the best
        return tokens[j] in guesses[j] if first else guesses[j][0] == tokens[j]

    rounds, i, n = [], 0, len(tokens)
    while i < n:
        accepted = 0
        while accepted < longest and i + accepted < n and accepted_at(i + accepted, accepted == 0):
            accepted += 1
        if i + accepted >= n:  # the bonus token lies past the stretch
            if accepted:
                rounds.append(accepted + 1)
            break
        rounds.append(accepted + 1)
        i += accepted + 1
    return rounds
