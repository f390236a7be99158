"""Prefilling, Rank-Assisted Prefilling (RAP / AutoRAP) and decoding-parameter attacks."""

from deepalign.attacks.rap import RAPConfig, RAPResult, rap_attack, rap_attack_unbatched
from deepalign.attacks.selectors import (
    CallableSelector,
    Candidate,
    ConsoleSelector,
    Decision,
    LexiconSelector,
    synthetic_oracle,
)

__all__ = ["CallableSelector", "Candidate", "ConsoleSelector", "Decision", "LexiconSelector", "RAPConfig",
           "RAPResult", "rap_attack", "rap_attack_unbatched", "synthetic_oracle"]
