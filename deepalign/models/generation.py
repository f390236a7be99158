"""Batched generation after a chat prompt and a forced assistant prefill."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from deepalign.models.chat import collate, render_chat


@dataclass(frozen=True)
class Sampling:
    """Decoding settings. ``temperature = 0`` (or ``do_sample=False``) is greedy decoding. The
    defaults are Qi et al.'s for prefilling attacks: temperature 0.9, top-p 0.6, 512 new tokens."""

    temperature: float = 0.9
    top_p: float = 0.6
    top_k: int | None = None
    max_new_tokens: int = 512

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generate_kwargs(self) -> dict:
        if self.greedy:
            return dict(do_sample=False)
        kwargs = dict(do_sample=True, temperature=self.temperature, top_p=self.top_p)
        kwargs["top_k"] = self.top_k if self.top_k is not None else 0  # 0 = no top-k filter
        return kwargs


GREEDY = Sampling(temperature=0.0)


def end_token_ids(tokenizer) -> list[int]:
    """EOS and the end-of-turn tokens of common chat templates present in the vocabulary."""
    ends = [tokenizer.eos_token_id]
    vocab = tokenizer.get_vocab()
    for token in ("<|end|>", "<|im_end|>", "<|eot_id|>", "<end_of_turn>"):
        if token in vocab:
            ends.append(vocab[token])
    return sorted({t for t in ends if t is not None})


@torch.no_grad()
def generate_after_prefill(model, tokenizer, prompts: Sequence[str], prefills: Sequence[Sequence[int]],
                           sampling: Sampling = GREEDY, *, seed: int | None = None, system: str | None = None,
                           max_new_tokens: int | None = None) -> list[str]:
    """For each prompt, decode after its prefill tokens; return the assistant text (the prefill
    included) up to the first end token. ``seed`` seeds sampling for reproducible runs."""
    if len(prompts) != len(prefills):
        raise ValueError(f"prompts ({len(prompts)}) and prefills ({len(prefills)}) must have the same length")
    examples = [render_chat(tokenizer, p, prefill=list(f), close_turn=False, system=system)
                for p, f in zip(prompts, prefills)]
    new_tokens = max_new_tokens or sampling.max_new_tokens
    context = getattr(model.config, "max_position_embeddings", None)
    longest = max((len(e) for e in examples), default=0)
    if context is not None and longest + new_tokens > context:
        raise ValueError(f"a prompt with its prefill has {longest} tokens; with {new_tokens} new tokens it exceeds "
                         f"the model's context of {context}")
    batch = collate(examples, tokenizer.pad_token_id)
    device = next(model.parameters()).device
    ends = end_token_ids(tokenizer)
    if seed is not None:
        torch.manual_seed(seed)
    mask = batch["attention_mask"].to(device)
    out = model.generate(batch["input_ids"].to(device), attention_mask=mask,
                         max_new_tokens=new_tokens, eos_token_id=ends,
                         pad_token_id=tokenizer.pad_token_id, **sampling.generate_kwargs())
    width = batch["input_ids"].shape[1]
    texts = []
    for row, example in enumerate(examples):
        generated = out[row, width:].tolist()
        cut = next((i for i, t in enumerate(generated) if t in ends), len(generated))
        texts.append(tokenizer.decode(list(example.tokens("prefill")) + generated[:cut], skip_special_tokens=True))
    return texts


def sample_next_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None) -> int:
    """One token from last-position ``logits [V]`` under ``sampling`` (the filters of Hugging Face's
    ``generate``: temperature, then top-k, then top-p keeping the smallest set with mass ≥ p)."""
    if sampling.greedy:
        return int(torch.argmax(logits))
    scores = logits.float() / sampling.temperature
    if sampling.top_k:
        kth = torch.topk(scores, min(sampling.top_k, scores.numel())).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if sampling.top_p < 1.0:
        ordered, order = torch.sort(scores, descending=True)
        mass_before = torch.softmax(ordered, dim=-1).cumsum(dim=-1) - torch.softmax(ordered, dim=-1)
        scores = scores.clone()
        scores[order[mass_before >= sampling.top_p]] = float("-inf")
    return int(torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator))
