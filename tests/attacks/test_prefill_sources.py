"""Where a prefill comes from (a text for all targets, the target's own, Qi et al.'s harmful prefix),
record tags and keys that keep two benchmark files apart, the decoding grid's families, and prompt
options (system prompt, a plain template for base models)."""

from __future__ import annotations

import argparse

import pytest

from deepalign.attacks.generation_attacks import (
    decoding_settings,
    harmful_prefix,
    plain_generate,
    prefill_attack,
    prefill_source,
)
from deepalign.data.benchmarks import AttackTarget
from deepalign.errors import InputError
from deepalign.io import JsonlLog
from deepalign.models.chat import encode_text, render_chat


class RecordingGenerate:
    """A ``generate`` that records the prefills it is given and answers with them."""

    def __init__(self, tokenizer):
        self.tokenizer, self.prefills = tokenizer, []

    def __call__(self, prompts, prefills, sampling, seed):
        self.prefills += [list(p) for p in prefills]
        return [self.tokenizer.decode(list(p)) for p in prefills]


def judge(target, output):
    return {"score": 0.0, "harmful": False}


def test_each_target_gets_the_prefill_its_source_says(world, tokenizer, tmp_path):
    item = world.harmful_items()[0]
    harmful = world.compliant_response(item)
    with_prefill = AttackTarget("a", world.request(item), prefill="to make")
    with_harmful = AttackTarget("b", world.request(item), harmful_response=harmful)
    generate = RecordingGenerate(tokenizer)
    records = prefill_attack(None, tokenizer, [with_prefill, with_harmful], judge, JsonlLog(tmp_path / "p.jsonl"),
                             prefill_lengths=(2, 4), progress=False, generate=generate)
    by_key = {r["key"]: r for r in records}
    assert by_key["a|prefill=target|run=0"]["prefill_text"] == "to make"
    assert by_key["b|prefill=2|run=0"]["prefill_tokens"] == 2
    # Qi et al.: the first k tokens of the harmful response, decoded, tokenised again.
    expected = {2: encode_text(tokenizer, tokenizer.decode(encode_text(tokenizer, harmful)[:2])),
                4: encode_text(tokenizer, tokenizer.decode(encode_text(tokenizer, harmful)[:4]))}
    assert sorted(map(tuple, generate.prefills)) == sorted([tuple(encode_text(tokenizer, "to make")),
                                                            tuple(expected[2]), tuple(expected[4])])
    # A text given for all targets wins over each target's own.
    given = prefill_attack(None, tokenizer, [with_prefill, with_harmful], judge, JsonlLog(tmp_path / "g.jsonl"),
                           prefill_text="sure", progress=False, generate=RecordingGenerate(tokenizer))
    assert sorted(r["key"] for r in given) == ["a|prefill=given|run=0", "b|prefill=given|run=0"]
    assert {r["prefill_text"] for r in given} == {"sure"}


def test_a_target_without_any_prefill_is_named():
    assert prefill_source(AttackTarget("x", "q", prefill="p")) == "target"
    assert prefill_source(AttackTarget("x", "q", harmful_response="h")) == "harmful-prefix"
    assert prefill_source(AttackTarget("x", "q"), "given") == "given"
    with pytest.raises(InputError, match="target 'x' has no prefill and no harmful response.*--prefill TEXT"):
        prefill_source(AttackTarget("x", "q"))


def test_harmful_prefix_of_zero_tokens_is_empty(tokenizer):
    assert harmful_prefix(tokenizer, "to make bread", 0) == []


def test_tags_go_into_records_and_the_source_into_keys(world, tokenizer, tmp_path):
    item = world.harmful_items()[0]
    target = AttackTarget("row-1", world.request(item), prefill="to make")
    log = JsonlLog(tmp_path / "both.jsonl")
    for source in ("first.csv", "second.csv"):  # the same id in two files: two records, not one
        prefill_attack(None, tokenizer, [target], judge, log, progress=False, generate=RecordingGenerate(tokenizer),
                       tags={"source": source, "model": "m"})
    records = JsonlLog(tmp_path / "both.jsonl").records()
    assert [r["key"] for r in records] == ["first.csv:row-1|prefill=target|run=0",
                                           "second.csv:row-1|prefill=target|run=0"]
    assert all(r["model"] == "m" and r["prefill"] == "to make" for r in records)


def test_decoding_grid_families():
    assert len(decoding_settings()) == 50
    assert [n for n, _ in decoding_settings(("greedy", "top_k"))][:3] == ["greedy", "top_k=1", "top_k=2"]
    assert len(decoding_settings(("temperature",))) == 20
    with pytest.raises(InputError, match="decoding families"):
        decoding_settings(("beam",))


def test_the_system_prompt_reaches_the_model(world, tokenizer, monkeypatch):
    import deepalign.attacks.generation_attacks as attacks

    seen = {}

    def fake(model, tok, prompts, prefills, sampling, *, seed=None, system=None, max_new_tokens=None):
        seen["system"] = system
        return [""] * len(prompts)

    monkeypatch.setattr(attacks, "generate_after_prefill", fake)
    plain_generate(None, tokenizer, "be terse")(["q"], [[]], None, 0)
    assert seen["system"] == "be terse"


def test_a_model_without_a_chat_template_is_refused_with_the_fix(world):
    from deepalign.cli.attack import apply_prompt_options

    tokenizer = world.tokenizer()
    tokenizer.chat_template = None
    args = argparse.Namespace(chat_template=None, system=None, model="base-model")
    with pytest.raises(InputError, match="base-model: .*no chat template.*--chat-template plain"):
        apply_prompt_options(args, tokenizer)
    apply_prompt_options(argparse.Namespace(chat_template="plain", system="oil", model="base-model"), tokenizer)
    spans = render_chat(tokenizer, "to make poison ?", prefill="to", close_turn=False, system="oil")
    assert tokenizer.decode(list(spans.input_ids)).split() == ["oil", "to", "make", "poison", "?", "to"]


def test_rap_starts_from_the_targets_text_prefill(world, tokenizer):
    from deepalign.attacks.runner import rap_prefill

    target = AttackTarget("x", "q", harmful_response="to make bread", prefill="heat oil")
    assert rap_prefill(tokenizer, target, 2) == encode_text(tokenizer, "heat oil")
    assert rap_prefill(tokenizer, AttackTarget("y", "q", harmful_response="to make bread"), 2) == \
        encode_text(tokenizer, "to make")
    assert rap_prefill(tokenizer, AttackTarget("z", "q"), 0) == []


def test_the_lexicon_selector_blocks_whole_words_not_first_pieces():
    from deepalign.attacks.selectors import Candidate, LexiconSelector

    un, able, der, sorry = 11, 12, 13, 14  # "unable" = un + able; "under" = un + der; "sorry" one token
    selector = LexiconSelector(blocked_sequences=[[un, able], [sorry]])
    candidates = [Candidate(t, r, 0.1) for r, t in enumerate((un, able, der, sorry))]
    assert selector.flags(0, [], candidates) == [True, True, True, False]  # "un" may start "under"
    assert selector.flags(0, [5, un], candidates) == [True, False, True, False]  # "able" would finish "unable"


def test_a_default_system_prompt_reaches_renderings_that_give_none(world):
    from deepalign.models.chat import set_chat_template, set_default_system

    tokenizer = world.tokenizer()
    set_chat_template(tokenizer, "plain")
    set_default_system(tokenizer, "oil")
    words = tokenizer.decode(list(render_chat(tokenizer, "to make poison ?", close_turn=False).input_ids)).split()
    assert words == ["oil", "to", "make", "poison", "?"]
    given = render_chat(tokenizer, "to make poison ?", close_turn=False, system="heat")
    assert tokenizer.decode(list(given.input_ids)).split()[0] == "heat"  # an explicit one still wins
