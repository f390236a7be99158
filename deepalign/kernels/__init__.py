"""Triton kernels with PyTorch references. Imports torch (and, lazily, triton) only."""

from deepalign.kernels.topk_rank import MAX_K, NonFiniteLogitsError, TopKRank, topk_rank, topk_rank_chunked

__all__ = ["MAX_K", "NonFiniteLogitsError", "TopKRank", "topk_rank", "topk_rank_chunked"]
