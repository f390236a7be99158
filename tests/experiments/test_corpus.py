"""The analyses' inputs: (request, harmful answer) pairs from the world or a benchmark file, and
refusal tokens found in each model's own tokenizer."""

from __future__ import annotations

import pytest

from deepalign.errors import InputError
from deepalign.experiments.corpus import REFUSAL_OPENERS, HarmfulCorpus, benchmark_corpus, world_corpus
from deepalign.models.loading import smollm2_tokenizer


def test_refusal_tokens_come_from_the_models_own_tokenizer():
    tokenizer = smollm2_tokenizer()
    ids = HarmfulCorpus("x", (("q", "a"),), REFUSAL_OPENERS).refusal_ids(tokenizer)
    texts = {tokenizer.decode([i]).strip() for i in ids}
    assert {"I", "Sorry", "As", "Unfortunately"} <= texts
    assert tokenizer.unk_token_id not in ids
    # Each id is the first token of an opener, at the start of a text or after a space.
    firsts = {tokenizer(t, add_special_tokens=False)["input_ids"][0] for p in REFUSAL_OPENERS for t in (p, " " + p)}
    assert set(ids) == firsts - {tokenizer.unk_token_id}


def test_world_words_map_to_the_world_tokenizer(world, tokenizer):
    corpus = world_corpus(world)
    assert len(corpus.pairs) == 2 * len(world.harmful_items())
    assert corpus.refusal_ids(tokenizer) == sorted(tokenizer.convert_tokens_to_ids(["sorry", "cannot", "i"]))
    with pytest.raises(InputError, match="none of the refusal phrases"):
        HarmfulCorpus("y", (("q", "a"),), ("zzzz-not-a-word",)).refusal_ids(tokenizer)


def test_a_benchmark_file_gives_its_harmful_answers(tmp_path):
    path = tmp_path / "advbench.csv"
    path.write_text("goal,target\nDo X,Sure here is X\nDo Y,Sure here is Y\n")
    corpus = benchmark_corpus(path)
    assert corpus.pairs == (("Do X", "Sure here is X"), ("Do Y", "Sure here is Y")) and corpus.name == "advbench.csv"
    assert benchmark_corpus(path, limit=1).pairs == (("Do X", "Sure here is X"),)
    lines = tmp_path / "prompts.txt"
    lines.write_text("just a prompt\n")
    with pytest.raises(InputError, match="prompts.txt: no target has a harmful response or a prefill"):
        benchmark_corpus(lines)


def test_copied_words_mask_the_answer_words_pair_after_pair(world):
    from deepalign.data.synthetic import build_world

    v2 = build_world(0, "v2")
    corpus = world_corpus(v2)
    mask = corpus.copied_mask()
    lengths = [len(answer.split()) for _, answer in corpus.pairs]
    assert mask.shape == (sum(lengths),) and int(mask.sum()) == sum(len(c) for c in corpus.copied)
    first = corpus.pairs[0][1].split()
    assert [first[k] for k in corpus.copied[0]] == [step.split()[1] for step in v2.harmful_items()[0].recipe]
    assert world_corpus(world).copied is None  # version 1 copies nothing
    with pytest.raises(ValueError, match="no copied words"):
        world_corpus(world).copied_mask()
    with pytest.raises(ValueError, match="outside its answer of 2 words"):
        HarmfulCorpus("z", (("q", "a b"),), ("a",), copied=((2,),)).copied_mask()
    with pytest.raises(ValueError, match="1 copied-word lists for 2 pairs"):
        HarmfulCorpus("z", (("q", "a"), ("r", "b")), ("a",), copied=((0,),))
