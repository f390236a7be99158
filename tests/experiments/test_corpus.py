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
