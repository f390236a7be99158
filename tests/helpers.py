"""Shared test helpers: the device kernels run on, float64 oracles written from the definitions, a saved tiny model."""

from __future__ import annotations

import contextlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

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


def plain_prefill_attention(q, k, v, prefill_mask, *, causal=True, scale=None, key_padding_mask=None,
                            window=None, softcap=None, dtype=None):
    """Materialised attention written from the definition, computed in ``dtype`` (default: q's).

    With ``dtype=torch.float64`` it is the oracle; in the inputs' own dtype it is "plain PyTorch in
    the same precision", whose error the FlashAttention recipe uses as the yardstick. Returns
    ``(out, mass)``, differentiable.
    """
    dtype = dtype or q.dtype
    batch, heads_q, num_queries, dim = q.shape
    heads_kv, num_keys = k.shape[1], k.shape[2]
    group = heads_q // heads_kv
    scale = scale if scale is not None else dim ** -0.5
    qd, kd, vd = (t.to(dtype) for t in (q, k, v))
    kd, vd = kd.repeat_interleave(group, dim=1), vd.repeat_interleave(group, dim=1)
    scores = (qd @ kd.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    i = torch.arange(num_queries, device=q.device)[:, None] + (num_keys - num_queries)
    j = torch.arange(num_keys, device=q.device)[None, :]
    visible = torch.ones(num_queries, num_keys, dtype=torch.bool, device=q.device)
    if causal:
        visible &= j <= i
    if window is not None:
        visible &= j > i - window
    visible = visible[None, None].expand(batch, heads_q, num_queries, num_keys)
    if key_padding_mask is not None:
        visible = visible & key_padding_mask[:, None, None, :]
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with no visible key: all zero
    out = probs @ vd
    mass = (probs * prefill_mask[:, None, None, :].to(dtype)).sum(-1)
    return out, mass


def save_tiny_model(folder, tokenizer, *, seed: int, layers: int):
    """A tiny random Llama (4 heads, 2 KV heads) over ``tokenizer``'s vocabulary, saved with the
    tokenizer into ``folder`` so that loaders and TransformerLens bridges can read it."""
    from deepalign.models.loading import tiny_random_model

    tiny_random_model(vocab_size=len(tokenizer), seed=seed, layers=layers, heads=4, kv_heads=2).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder



class _ChatCompletionsHandler(BaseHTTPRequestHandler):
    """``POST …/chat/completions``: the reply text comes from the server's ``answer(handler, body)``
    (``None``: it sent its own reply, e.g. an error status); every request is kept."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append((self.path, self.headers.get("Authorization"), body))
        answer = self.server.answer(self, body)
        if answer is None:
            return
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serve_chat_completions(answer):
    """A fake OpenAI-compatible server on 127.0.0.1 (a thread); yields ``(base_url, requests)``."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ChatCompletionsHandler)
    server.answer, server.requests = answer, []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", server.requests
    finally:
        server.shutdown()
        server.server_close()
