"""When speculation steps aside: plain steps while the draft's recent rounds do not pay for themselves.

A round costs `break_even` plain steps (its draft and its verify of the whole tree, measured by the
tuner on this device); it pays when it emits more tokens than that. Where the draft keeps missing
(sampling at temperature 1 with drafts trained on greedy answers, a subject the draft never saw) a
CPU's round can cost more than the tokens it emits, and speculative decoding runs slower than plain
decoding. The policy watches a moving average of tokens per round and, when it falls clearly under
`break_even` (under `pause_under` x `break_even`), takes plain steps for a while, then tries one
round again; each failed try doubles the pause, up to `longest_pause`.

Why a margin and a slow average: a pause has costs of its own (the draft commits the paused steps'
tokens in one extend before its next round, and the tries are rounds at a low acceptance), and
acceptance swings from round to round. On the demo pair (bfloat16 target, tree (3,1,4), 10 held-out
prompts, break-even taken as 1.68 plain steps; the same script measured a round at 1.62-1.69),
pausing at the break-even itself, with the newest round weighted 0.25 and pauses allowed from the
third round, took 30% of the greedy tokens by plain steps and ran 1.12x plain against 1.23x without
pausing; weighting 0.1, from the eighth round, at 0.9 of the break-even, it ran 1.31x against 1.31x
greedy and 0.96x against 0.86x at temperature 1 (`/work`-only script, one run each; this machine's
run-to-run noise is ~10%).

Decisions depend only on the accepted lengths, never on clocks, so a seeded request gives the
same tokens on every run. Output is the target's either way: a plain step is one target forward
and one sample (greedy: the argmax), exactly as plain decoding takes it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class PausePolicy:
    break_even: float        # tokens per round at which a round costs what plain steps would
    pause_under: float = 0.9  # a pause starts when the average falls under this fraction of break_even
    smoothing: float = 0.1   # weight of the newest round in the moving average
    first_rounds: int = 8    # rounds observed before the first pause may start
    first_pause: int = 8     # plain steps in the first pause after rounds that paid
    longest_pause: int = 64  # a pause doubles after each try that still does not pay, up to this

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
        p = self.policy
        if p is None:
            return
        self.rounds += 1
        self.mean = float(emitted) if self.mean is None else self.mean + p.smoothing * (emitted - self.mean)
        if self.rounds < p.first_rounds:
            return
        if self.mean < p.pause_under * p.break_even:
            self.steps_left = self.next_pause
            self.next_pause = min(2 * self.next_pause, p.longest_pause)
        else:
            self.next_pause = p.first_pause
