"""Analysis: rank matching now; TransformerLens-based attention, KL and plots build on it."""

from deepalign.analysis.ranks import (
    pfa1_score,
    rank_vector,
    sequence_target_ranks,
    target_ranks_from_hidden,
    weighted_spearman,
)

__all__ = ["pfa1_score", "rank_vector", "sequence_target_ranks", "target_ranks_from_hidden", "weighted_spearman"]
