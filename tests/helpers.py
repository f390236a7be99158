"""Shared test helpers: the device kernels run on, and float64 oracles written from the definitions."""

from __future__ import annotations

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def oracle_topk_rank(logits: torch.Tensor, k: int, targets: torch.Tensor | None):
    """float64 oracle, straight from the contract: order by value descending then index ascending
    (a stable descending sort), rank(t) = #{x_v > x_t} + #{v < t : x_v == x_t}."""
    x = logits.detach().cpu().to(torch.float64)
    order = torch.sort(x, dim=1, descending=True, stable=True)
    lse = torch.logsumexp(x, dim=1)
    out = {"values": order.values[:, :k], "indices": order.indices[:, :k], "logsumexp": lse}
    if targets is not None:
        t = targets.detach().cpu().reshape(x.shape[0], -1)
        xt = x.gather(1, t)
        index = torch.arange(x.shape[1])
        greater = (x[:, None, :] > xt[:, :, None]).sum(-1)
        tied_before = ((x[:, None, :] == xt[:, :, None]) & (index[None, None, :] < t[:, :, None])).sum(-1)
        logprob = torch.where(xt == float("-inf"), float("-inf"), xt - lse[:, None])
        out["target_rank"] = (greater + tied_before).reshape(targets.shape)
        out["target_logprob"] = logprob.reshape(targets.shape)
    return out
