"""AutoRAP: candidate refusal tokens, refusal data, the re-drawn augmentation, training, use."""

from __future__ import annotations

import collections
import inspect
import random
import types

import torch
import transformers

from deepalign.attacks.autorap import (
    AutoRAPRecipe,
    build_dataset,
    candidate_refusal_tokens,
    cut_after_random_sentence,
    read_dataset,
    write_dataset,
)
from deepalign.attacks.rap import RAPConfig, rap_attack
from deepalign.attacks.selectors import ClassifierSelector
from deepalign.models.chat import encode_text, render_chat
from deepalign.models.loading import tiny_random_model
from deepalign.training.trainer import Trainer, TrainerConfig


def rows(world):
    return [(world.request(item, p), world.compliant_response(item)) for item in world.harmful_items() for p in range(2)]


def helper_model(tokenizer):
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      pad_token_id=tokenizer.pad_token_id, num_labels=2)
    torch.manual_seed(0)
    return transformers.LlamaForTokenClassification(config)


class ScriptedModel(torch.nn.Module):
    """A stand-in target model whose next-token logits are scripted: on its n-th call the logits at
    the last position rank ``TOP[n]`` first (in that order); every earlier position ranks tokens
    20, 21, 22 first, so reading any position but the last gives other candidates."""

    VOCAB = 32
    TOP = [[9, 4, 1], [4, 9, 6], [9, 1, 3], [0, 8, 9]]

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.seen = []

    def forward(self, input_ids, **kwargs):
        top = self.TOP[len(self.seen)]
        self.seen.append(input_ids[0].tolist())
        length = input_ids.shape[1]
        logits = -1.0 - 0.01 * torch.arange(self.VOCAB, dtype=torch.float32).repeat(1, length, 1)
        logits[0, :, [20, 21, 22]] = torch.tensor([10.0, 9.0, 8.0])
        logits[0, -1] = -1.0 - 0.01 * torch.arange(self.VOCAB, dtype=torch.float32)
        logits[0, -1, top] = torch.tensor([10.0, 9.0, 8.0])
        return types.SimpleNamespace(logits=logits)


def test_candidates_are_top_k_tokens_counted_at_least_tau_times(world, tokenizer):
    """Top-3 lists by hand: [9, 4, 1], [4, 9, 6], [9, 1, 3], [0, 8, 9]. Counts: 9 → 4, 4 → 2,
    1 → 2, and 6, 3, 0, 8 → 1. So τ = 2 gives [9, 1, 4] (most frequent first, ties by lower id),
    τ = 3 gives [9], τ = 1 gives [9, 1, 4, 0, 3, 6, 8] and τ = 5 nothing."""
    data = rows(world)[:4]
    want = {1: [9, 1, 4, 0, 3, 6, 8], 2: [9, 1, 4], 3: [9], 4: [9], 5: []}
    for threshold, expected in want.items():
        model = ScriptedModel()
        candidates, prefills = candidate_refusal_tokens(model, tokenizer, data, k=3, threshold=threshold, seed=1)
        assert candidates == expected, (threshold, candidates)
        # Each row was read once, as prompt + its drawn prefill (1..|h| leading harmful tokens).
        assert len(model.seen) == len(data) == len(prefills)
        for (prompt, harmful), prefill, seen in zip(data, prefills, model.seen):
            tokens = encode_text(tokenizer, harmful)
            assert 1 <= len(prefill) <= len(tokens) and prefill == tokens[:len(prefill)]
            assert seen == list(render_chat(tokenizer, prompt, prefill=prefill, close_turn=False).input_ids)
            assert seen[-len(prefill):] == prefill
    signature = inspect.signature(candidate_refusal_tokens).parameters
    assert signature["k"].default == 20 and signature["threshold"].default == 2  # the authors' k and τ


def test_dataset_round_trip_and_augmentation(world, tokenizer, tmp_path):
    model = tiny_random_model(vocab_size=len(tokenizer), seed=4)
    data = build_dataset(model, tokenizer, rows(world)[:4], threshold=2, max_new_tokens=4, progress=False)
    assert all(len(r.refusals) == len(data[0].refusals) > 0 for r in data)
    assert read_dataset(write_dataset(tmp_path / "autorap.jsonl", data)) == data
    recipe = AutoRAPRecipe(tokenizer, tokenizer, data)
    rng = random.Random(0)
    labels = collections.Counter()
    for _ in range(400):
        row = data[rng.randrange(len(data))]
        prefill, label = recipe.draw(row, rng)
        labels[label] += 1
        words, harmful = prefill.split(), row.harmful_response.split()
        if label == 1:  # harmful tokens only: a prefix of the harmful response
            assert harmful[: len(words)] == words
        else:  # a harmful prefix, then the first 1-5 words of one of the refusal continuations
            assert any(words[-m:] == r.split()[:m] and harmful[: len(words) - m] == words[:-m]
                       for r in row.refusals for m in range(1, 6) if len(r.split()) >= m and len(words) > m)
    assert abs(labels[1] / 400 - 0.5) < 0.08
    assert cut_after_random_sentence("one . two ! three ?", random.Random(3)) in ("one .", "one . two !",
                                                                                  "one . two ! three ?")


def test_train_the_helper_and_attack_with_it(world, tokenizer, tmp_path):
    target = tiny_random_model(vocab_size=len(tokenizer), seed=4)
    data = build_dataset(target, tokenizer, rows(world)[:6], threshold=2, max_new_tokens=3, progress=False)
    helper = helper_model(tokenizer)
    recipe = AutoRAPRecipe(tokenizer, tokenizer, data)
    history = Trainer(helper, tokenizer, recipe, TrainerConfig(output_dir=str(tmp_path), steps=12, batch_size=8,
                                                               lr=3e-3, progress=False)).train()
    assert all(0 <= row["accuracy"] <= 1 for row in history) and history[-1]["loss"] < history[0]["loss"]
    selector = ClassifierSelector(helper.eval(), tokenizer, tokenizer, [1], kind="token", chat=True)
    prompts = [world.request(item) for item in world.harmful_items()[:2]]
    results = rap_attack(target, tokenizer, prompts, [[], []], selector, RAPConfig(k=5, max_new_tokens=6,
                                                                                   max_steps=20), progress=False)
    assert len(results) == 2 and all(r.steps > 0 for r in results)


class PrefillSensitiveClassifier(torch.nn.Module):
    """A token classifier whose verdict depends on the prefill: "harmful" (label 1) at the last
    position iff the input holds ``marker`` (a token the prefill carries and the candidates do not)."""

    def __init__(self, marker: int):
        super().__init__()
        self.marker = marker
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.config = type("Config", (), {"id2label": {0: "safe", 1: "harmful"}})()

    def forward(self, input_ids, attention_mask=None):
        seen = (input_ids == self.marker).any(dim=1).float()
        logits = torch.stack([1 - seen, seen], dim=-1) * 10.0
        return type("Output", (), {"logits": logits[:, None, :].expand(-1, input_ids.shape[1], -1)})()


def test_autorap_classifies_prefill_plus_selected_tokens_plus_candidate(world, tokenizer):
    """Vega & Singh's auto_rap.py classifies prefill + generated tokens + candidate: a classifier
    that looks for a token of the prefill must see it at every step."""
    from deepalign.attacks.selectors import Candidate

    item = world.harmful_items()[0]
    prefill = encode_text(tokenizer, world.compliant_response(item))[:5]
    in_prompt = set(render_chat(tokenizer, world.request(item), prefill=[], close_turn=False).input_ids)
    marker = next(t for t in prefill if t not in in_prompt)
    others = [t for t in range(len(tokenizer)) if t != marker and t not in prefill][:3]
    selector = ClassifierSelector(PrefillSensitiveClassifier(marker), tokenizer, tokenizer, [1], kind="token",
                                  chat=True)
    candidates = [Candidate(t, rank, 0.1) for rank, t in enumerate(others)]
    selector.begin([world.request(item)], [prefill])
    assert selector.flags(0, [others[0]], candidates) == [True, True, True]
    selector.begin([world.request(item)], [[]])  # without the prefill the marker is nowhere
    assert selector.flags(0, [others[0]], candidates) == [False, False, False]
    # Through RAP: with the prefill the classifier calls the top candidate harmful at once.
    target = tiny_random_model(vocab_size=len(tokenizer), seed=4)
    result = rap_attack(target, tokenizer, [world.request(item)], [prefill], selector,
                        RAPConfig(k=3, max_new_tokens=2, max_steps=4), progress=False)[0]
    assert result.backtracks == 0 and len(result.tokens) == 2
