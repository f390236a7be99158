"""AutoRAP: candidate refusal tokens, refusal data, the re-drawn augmentation, training, use."""

from __future__ import annotations

import collections
import random

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
from deepalign.kernels import topk_rank
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


def test_candidates_are_top20_tokens_counted_at_least_tau_times(world, tokenizer):
    model = tiny_random_model(vocab_size=len(tokenizer), seed=4)
    data = rows(world)
    candidates, prefills = candidate_refusal_tokens(model, tokenizer, data, k=20, threshold=2, seed=1)
    counts = collections.Counter()
    for (prompt, harmful), prefill in zip(data, prefills):
        assert 1 <= len(prefill) <= len(encode_text(tokenizer, harmful))
        spans = render_chat(tokenizer, prompt, prefill=prefill, close_turn=False)
        counts.update(topk_rank(model(torch.tensor([spans.input_ids])).logits[:, -1], 20).indices[0].tolist())
    assert set(candidates) == {t for t, c in counts.items() if c >= 2}
    assert [counts[t] for t in candidates] == sorted((counts[t] for t in candidates), reverse=True)


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
                                                                                   max_interactions=20), progress=False)
    assert len(results) == 2 and all(r.interactions > 0 for r in results)
