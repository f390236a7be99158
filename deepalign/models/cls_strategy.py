"""Strategic attention windows, re-classification schedules and strategic decoding for the [CLS]
safety signal (Li & Kim, ICML 2025), as a state machine for one response.

Indices are *content* indices: the user's words first (``0 … n_input − 1``; rule 4: pad, BOS and
template tokens are never counted or attended), then every response token (prefill, generated,
inserted) in order. ``C`` is the number of content tokens so far, the newest at ``C − 1``.

Windows (which content tokens [CLS] attends to when it re-classifies):

* rule 1, first classification malicious: the input and the first ``r1`` response tokens,
  ``[0, n_input + r1)``;
* rule 2, benign: the latest ``r2`` tokens, ``[C − r2, C)``;
* rule 3, after a benign → malicious switch at ``S``: ``[S − r2, S + r3]``; a benign verdict before
  the switch is confirmed is a false trigger and falls back to rule 2.

The first classification (before the first new token) reads the input alone. Schedules say when
[CLS] re-classifies while generating (step ``k`` appends the k-th new token, prefill excluded):

* ``each``: every step; ``first``: never (the first classification only);
* ``periodic``: every ``period`` (10) steps;
* ``annealing`` (our reading of the paper's schedule): after steps 1, 2, 4, 8, … — the gap doubles
  after every verdict up to ``max_interval`` (16) and restarts at 1 after a malicious verdict that
  could start a switch (not once the response is already refusing).

While a switch awaits confirmation, [CLS] re-classifies at every step whatever the schedule.

Strategic decoding, medium dependency: a malicious first classification inserts the refusal
lead-in at once, after any prefill, and the model explains; ``tau`` consecutive malicious verdicts
after a switch at ``S`` withdraw the tokens from ``S`` on and insert the lead-in there. Once the
lead-in is in, nothing more is inserted.
"""

from __future__ import annotations

from dataclasses import dataclass

SCHEDULES = ("each", "first", "periodic", "annealing")


@dataclass(frozen=True)
class StrategyConfig:
    schedule: str = "annealing"
    r1: int = 10
    r2: int = 10
    r3: int = 10
    tau: int = 2  # consecutive malicious verdicts that confirm a late switch (1 … 3)
    period: int = 10
    max_interval: int = 16
    threshold: float = 0.5  # p(malicious) at or above which a verdict is malicious
    strategic_decoding: bool = True  # False: classify (and expose the verdicts) but never insert

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        for name in ("r1", "r2", "r3", "period", "max_interval"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(self.tau, bool) or not isinstance(self.tau, int) or not 1 <= self.tau <= 3:
            raise ValueError(f"tau must be 1, 2 or 3, got {self.tau!r}")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")


@dataclass(frozen=True)
class Insertion:
    """Insert the lead-in at content index ``at`` (tokens from ``at`` on are withdrawn first)."""

    at: int
    rule: str  # "first" (rule 1) or "switch" (rule 3, confirmed)


class Strategy:
    """The state machine of one response. Call :meth:`start` with the first verdict, then at each
    step :meth:`due` → (if due) :meth:`window` → :meth:`observe`."""

    def __init__(self, config: StrategyConfig, n_input: int):
        if n_input < 1:
            raise ValueError("the input has no content token to classify (rule 4 leaves nothing)")
        self.config = config
        self.n_input = n_input
        self.state = "benign"
        self.switch: int | None = None  # content index of a pending (or confirmed) switch
        self.count = 0  # consecutive malicious verdicts since the switch
        self.first_malicious = False
        self.interval = 1
        self.next_check = 1
        self.inserted: Insertion | None = None

    def start(self, malicious: bool, content_length: int) -> Insertion | None:
        """The first classification (input window), before any new token."""
        if malicious:
            self.first_malicious = True
            self.state = "refusing"
            if self.config.strategic_decoding:
                self.inserted = Insertion(content_length, "first")
                return self.inserted
        return None

    def due(self, step: int) -> bool:
        """Re-classify after appending the ``step``-th new token (1-based)?"""
        if self.state == "suspect":
            return True
        schedule = self.config.schedule
        if schedule == "each":
            return True
        if schedule == "first":
            return False
        if schedule == "periodic":
            return step % self.config.period == 0
        return step >= self.next_check

    def window(self, content_length: int) -> range:
        """Content indices [CLS] attends to now (``content_length`` = C, the newest token included)."""
        c = self.config
        if self.state == "refusing" and self.first_malicious:
            return range(0, min(content_length, self.n_input + c.r1))
        if self.switch is not None:  # suspect, or refusing after a confirmed switch
            return range(max(0, self.switch - c.r2), min(content_length, self.switch + c.r3 + 1))
        return range(max(0, content_length - c.r2), content_length)

    def observe(self, malicious: bool, step: int, content_length: int) -> Insertion | None:
        """A re-classification's verdict at ``step`` (the newest token has index C − 1)."""
        self._schedule_next(malicious and self.state != "refusing", step)
        if self.state == "refusing":
            return None
        if self.state == "benign":
            if not malicious:
                return None
            self.state, self.switch, self.count = "suspect", content_length - 1, 1
        elif malicious:
            self.count += 1
        else:  # a false trigger: back to rule 2
            self.state, self.switch, self.count = "benign", None, 0
            return None
        if self.count < self.config.tau:
            return None
        self.state = "refusing"  # confirmed; without strategic decoding it is only flagged
        if not self.config.strategic_decoding:
            return None
        self.inserted = Insertion(self.switch, "switch")
        return self.inserted

    def _schedule_next(self, reset: bool, step: int) -> None:
        """Annealing: checks at 1, 2, 4, 8, 16, then every ``max_interval``; 1 again after ``reset``."""
        if reset:
            self.interval, self.next_check = 1, step + 1
        else:
            self.next_check = step + self.interval
            self.interval = min(2 * self.interval, self.config.max_interval)
