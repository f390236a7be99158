"""Triton kernels with PyTorch references. Imports torch (and, lazily, triton) only."""

from deepalign.kernels.attention import prefill_attention
from deepalign.kernels.ranking import MAX_K, NonFiniteLogitsError, TopKChecks, TopKRank, topk_rank, topk_rank_chunked

__all__ = ["MAX_K", "NonFiniteLogitsError", "TopKChecks", "TopKRank", "prefill_attention", "topk_rank", "topk_rank_chunked"]
