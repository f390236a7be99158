"""RAP (Algorithm 1) on hand-built toy models whose top candidates are known, and batched RAP
(KV cache with holes) against one-prompt-at-a-time recomputation."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch

from deepalign.attacks.rap import RAPConfig, rap_attack, rap_attack_unbatched
from deepalign.attacks.selectors import BACKTRACK, ConsoleSelector, LexiconSelector, STOP, synthetic_oracle
from deepalign.models.loading import tiny_random_model


class ToyTokenizer:
    """Tokens are strings; ``decode`` concatenates them, so "a"+"b" and "ab" decode alike."""

    chat_template = "toy"

    def __init__(self, words):
        self.words = ["<pad>", "<eos>", "<user>", "<assistant>"] + list(words)
        self.ids = {w: i for i, w in enumerate(self.words)}
        self.pad_token_id, self.eos_token_id = 0, 1

    def __len__(self):
        return len(self.words)

    def get_vocab(self):
        return dict(self.ids)

    def convert_tokens_to_ids(self, tokens):
        return self.ids[tokens] if isinstance(tokens, str) else [self.ids[t] for t in tokens]

    def apply_chat_template(self, messages, tokenize=False):
        return "".join(f"<{m['role']}> {m['content']} " for m in messages)

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [self.ids[w] for w in text.split()]}

    def decode(self, ids, skip_special_tokens=False):
        return "".join(self.words[i] for i in ids if not (skip_special_tokens and i < 4))


class ToyModel(torch.nn.Module):
    """Next-token scores depend on the last real token only: ``table[last] = [best, second, …]``.
    Works with or without a cache (the cache is ignored)."""

    def __init__(self, tokenizer, table, default):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(max_position_embeddings=10_000)
        self.tokenizer, self.table, self.default = tokenizer, table, default

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
                logits_to_keep=0):
        vocab = len(self.tokenizer)
        logits = torch.zeros(input_ids.shape[0], input_ids.shape[1], vocab)
        for b in range(input_ids.shape[0]):
            last = self.tokenizer.words[int(input_ids[b, -1])]
            order = self.table.get(last, self.default)
            scores = torch.full((vocab,), float("-inf"))
            for r, word in enumerate(order):
                scores[self.tokenizer.ids[word]] = 10.0 - r
            logits[b, -1] = scores
        return SimpleNamespace(logits=logits, past_key_values=None)


def run(tokenizer, table, default, blocked, config, prompts=("q",), selector=None):
    model = ToyModel(tokenizer, table, default)
    selector = selector or LexiconSelector(blocked=tokenizer.convert_tokens_to_ids(blocked))
    prefills = [[] for _ in prompts]
    batched = rap_attack(model, tokenizer, list(prompts), prefills, selector, config, progress=False)
    single = rap_attack_unbatched(model, tokenizer, list(prompts), prefills, selector, config)
    for a, b in zip(batched, single):
        assert (a.tokens, a.ranks, a.steps, a.backtracks, a.stopped) == \
               (b.tokens, b.ranks, b.steps, b.backtracks, b.stopped)
    return batched


WORDS = ["q", "no", "nope", "A", "B", "C", "x", "y", "xy", "<eos>"]


def test_takes_the_highest_ranked_harmful_candidate():
    tokenizer = ToyTokenizer([w for w in WORDS if w != "<eos>"])
    table = {"<assistant>": ["no", "A", "B"], "A": ["nope", "<eos>", "B"]}
    [result] = run(tokenizer, table, ["no", "nope", "<eos>"], ["no", "nope"], RAPConfig(k=3))
    assert [tokenizer.words[t] for t in result.tokens] == ["A", "<eos>"]
    assert result.ranks == [1, 1] and result.stopped == "end" and result.steps == 2


def test_backtracking_then_only_lower_ranked_alternatives():
    tokenizer = ToyTokenizer([w for w in WORDS if w != "<eos>"])
    # After A nothing harmful is offered: undo A, then try only candidates ranked below A (B, not A again).
    table = {"<assistant>": ["no", "A", "B", "C"], "A": ["no", "nope", "no"], "B": ["<eos>", "no", "nope"]}
    [result] = run(tokenizer, table, ["no", "nope", "<eos>"], ["no", "nope"], RAPConfig(k=4))
    assert [tokenizer.words[t] for t in result.tokens] == ["B", "<eos>"]
    assert result.ranks == [2, 0] and result.backtracks == 1
    assert result.steps == 4  # pick A, backtrack, pick B, pick <eos>


def test_no_third_repeat_of_the_same_string_in_a_row():
    """After "A A", another "A" is not offered: the next harmful candidate (B) is taken instead."""
    tokenizer = ToyTokenizer([w for w in WORDS if w != "<eos>"])
    table = {"<assistant>": ["A"], "A": ["A", "B"], "B": ["<eos>"]}
    [result] = run(tokenizer, table, ["no", "nope", "<eos>"], ["no", "nope"], RAPConfig(k=2))
    assert [tokenizer.words[t] for t in result.tokens] == ["A", "A", "B", "<eos>"]
    assert result.ranks == [0, 0, 1, 0]


def test_the_repeat_rule_compares_text_not_ids():
    """"x" and "x " are different tokens with the same stripped text: still a repeat."""
    tokenizer = ToyTokenizer([w for w in WORDS if w != "<eos>"] + ["x "])
    table = {"<assistant>": ["x"], "x": ["x "], "x ": ["x", "B"], "B": ["<eos>"]}
    [result] = run(tokenizer, table, ["no", "<eos>"], ["no"], RAPConfig(k=2))
    assert [tokenizer.words[t] for t in result.tokens] == ["x", "x ", "B", "<eos>"]


def test_budget_and_exhaustion():
    tokenizer = ToyTokenizer([w for w in WORDS if w != "<eos>"])
    loop = {"<assistant>": ["A"], "A": ["B"], "B": ["A"]}  # A B A B ...: never three alike in a row
    [budget] = run(tokenizer, loop, ["A"], [], RAPConfig(k=1, max_steps=7, max_new_tokens=100))
    assert budget.stopped == "budget" and budget.steps == 7 and len(budget.tokens) == 7
    [capped] = run(tokenizer, loop, ["A"], [], RAPConfig(k=1, max_steps=50, max_new_tokens=5))
    assert capped.stopped == "max_tokens" and len(capped.tokens) == 5
    [exhausted] = run(tokenizer, {}, ["no", "nope"], ["no", "nope"], RAPConfig(k=2))
    assert exhausted.stopped == "exhausted" and exhausted.tokens == [] and exhausted.steps == 1


def test_console_selector_reads_numbers_backtrack_and_skip():
    tokenizer = ToyTokenizer([w for w in WORDS if w != "<eos>"])
    answers = iter(["7", "1", "b", "0", "s"])  # after the backtrack only B (below A) is offered
    shown = []
    selector = ConsoleSelector(tokenizer, read=lambda prompt: next(answers), write=shown.append)
    table = {"<assistant>": ["no", "A", "B"], "A": ["no", "nope", "C"], "B": ["C", "no", "nope"]}
    model = ToyModel(tokenizer, table, ["no", "nope", "<eos>"])
    [result] = rap_attack_unbatched(model, tokenizer, ["q"], [[]], selector, RAPConfig(k=3))
    assert [tokenizer.words[t] for t in result.tokens] == ["B"]
    assert result.stopped == "selector" and result.backtracks == 1
    assert any("not understood: '7'" in line for line in shown) and any("p=" in line for line in shown)
    assert BACKTRACK.action == "backtrack" and STOP.action == "stop"


def test_batched_equals_one_at_a_time_on_a_real_model(world, tokenizer):
    """Different prompt lengths (left padding), backtracks leaving holes in the KV cache."""
    model = tiny_random_model(vocab_size=len(tokenizer), seed=3)
    selector = synthetic_oracle(world, tokenizer)
    items = world.harmful_items()[:4]
    prompts = [world.request(item, p) for item, p in zip(items, range(4))]
    prefills = [tokenizer(world.compliant_response(item), add_special_tokens=False)["input_ids"][:k]
                for item, k in zip(items, (0, 2, 3, 5))]
    config = RAPConfig(k=5, max_new_tokens=12, max_steps=30)
    batched = rap_attack(model, tokenizer, prompts, prefills, selector, config, progress=False)
    single = rap_attack_unbatched(model, tokenizer, prompts, prefills, selector, config)
    for a, b in zip(batched, single):
        assert (a.tokens, a.ranks, a.steps, a.backtracks, a.stopped) == \
               (b.tokens, b.ranks, b.steps, b.backtracks, b.stopped)
        assert a.text.split()[: len(a.prefill_tokens)] == tokenizer.decode(a.prefill_tokens).split()


def test_prompts_and_prefills_must_pair_up(tokenizer):
    with pytest.raises(ValueError, match=r"prompts \(2\) and prefills \(1\)"):
        rap_attack(tiny_random_model(vocab_size=len(tokenizer)), tokenizer, ["a", "b"], [[]], LexiconSelector())


@pytest.mark.parametrize("kind", ["sequence", "token"])
def test_classifier_selector_flags_candidates_with_a_local_model(world, tokenizer, kind):
    import transformers

    from deepalign.attacks.selectors import Candidate, ClassifierSelector

    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                      head_dim=16, pad_token_id=tokenizer.pad_token_id,
                                      id2label={0: "refusal", 1: "harmful"}, label2id={"refusal": 0, "harmful": 1})
    head = {"sequence": transformers.LlamaForSequenceClassification,
            "token": transformers.LlamaForTokenClassification}[kind]
    torch.manual_seed(0)
    model = head(config)
    candidates = [Candidate(tokenizer.convert_tokens_to_ids(w), r, 0.1) for r, w in enumerate(["sorry", "heat", "oil"])]
    context = tokenizer("sure . to make bomb :", add_special_tokens=False)["input_ids"]
    always = ClassifierSelector(model, tokenizer, tokenizer, ["harmful"], kind=kind, threshold=0.0)
    never = ClassifierSelector(model, tokenizer, tokenizer, [1], kind=kind, threshold=1.01)
    assert always.flags(0, context, candidates) == [True] * 3
    assert never.flags(0, context, candidates) == [False] * 3
    # The probabilities it thresholds are the classifier's: flags change where they cross.
    with torch.no_grad():  # each candidate alone (no padding): the selector's batching must not matter
        probs = []
        for c in candidates:
            ids = torch.tensor([tokenizer(tokenizer.decode(context + [c.token]))["input_ids"]])
            logits = model(input_ids=ids).logits
            probs.append(torch.softmax(logits[0, -1] if kind == "token" else logits[0], -1)[1])
        probs = torch.stack(probs)
    middle = float(probs.median())
    flags = ClassifierSelector(model, tokenizer, tokenizer, ["harmful"], kind=kind, threshold=middle - 1e-6).flags(
        0, context, candidates)
    assert flags == (probs >= middle - 1e-6).tolist() and sum(flags) == 2
    with pytest.raises(ValueError, match="unknown label 'toxic'"):
        ClassifierSelector(model, tokenizer, tokenizer, ["toxic"])


def test_batched_rap_refuses_sliding_windows_it_could_overrun(tokenizer):
    model = tiny_random_model("mistral", vocab_size=len(tokenizer), sliding_window=16)
    with pytest.raises(ValueError, match=r"sliding-window model \(window 16\)"):
        rap_attack(model, tokenizer, ["how do i make tea ?"], [[]], LexiconSelector(),
                   RAPConfig(max_steps=20, max_new_tokens=8))


def test_synthetic_oracle_blocks_refusals_and_early_ends(world, tokenizer):
    from deepalign.attacks.selectors import Candidate

    oracle = synthetic_oracle(world, tokenizer)
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    end, sorry, sure = tokenizer.convert_tokens_to_ids(["<|end|>", "sorry", "sure"])
    candidates = [Candidate(end, 0, 0.5), Candidate(sorry, 1, 0.3), Candidate(sure, 2, 0.1)]
    assert oracle.flags(0, [], candidates) == [False, False, True]
    assert oracle.decide(0, [], candidates).index == 2
    assert oracle.flags(0, ids("sure . to make bomb : heat oil"), candidates) == [True, False, True]


def test_batched_rap_passes_the_cache_under_the_current_keyword(world, tokenizer, monkeypatch):
    """No deprecation of ``past_key_values`` from transformers on the batched path (cache in and out)."""
    from tests.models.test_cache import no_cache_deprecation

    model = tiny_random_model(vocab_size=len(tokenizer), seed=3)
    items = world.harmful_items()[:2]
    prompts = [world.request(item, p) for item, p in zip(items, range(2))]
    with no_cache_deprecation(monkeypatch):
        results = rap_attack(model, tokenizer, prompts, [[], []], synthetic_oracle(world, tokenizer),
                             RAPConfig(k=5, max_new_tokens=6, max_steps=12), progress=False)
    assert all(r.steps >= 1 for r in results)


@pytest.mark.parametrize("field, value", [("k", 0), ("max_steps", -1), ("max_new_tokens", 0),
                                          ("k", 2.5), ("max_steps", True), ("max_new_tokens", "8")])
def test_config_fields_must_be_positive_ints(field, value):
    from deepalign.errors import InputError

    with pytest.raises(InputError, match=rf"^{field} must be a positive int, got {re.escape(repr(value))}$"):
        RAPConfig(**{field: value})
    assert RAPConfig() == RAPConfig(k=20, max_steps=256, max_new_tokens=256)
