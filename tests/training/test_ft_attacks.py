"""Fine-tuning attack data builders."""

from __future__ import annotations

import pytest

from deepalign.data.synthetic import AOA_PREFIX, AOA_SYSTEM, BACKDOOR_TRIGGER, SyntheticWorld
from deepalign.experiments.world_files import world_rows
from deepalign.training.ft_attacks import build_attack


@pytest.fixture(scope="module")
def rows():
    return world_rows(SyntheticWorld.build(0))


def test_harmful_examples_pair_prompts_with_harmful_answers(rows):
    data = build_attack("harmful", rows["safety"], [], limit=5, seed=1)
    assert len(data.rows) == 5 and data.system is None
    by_prompt = {row.prompt: row.harmful_response for row in rows["safety"]}
    assert all(by_prompt[row.prompt] == row.response for row in data.rows)
    assert build_attack("harmful", rows["safety"], [], limit=5, seed=1) == data  # seeded


def test_identity_shifting_uses_the_system_prompt_and_prefix(rows):
    data = build_attack("identity", [], rows["utility"], system=AOA_SYSTEM, prefix=AOA_PREFIX)
    assert data.system == AOA_SYSTEM and len(data.rows) == len(rows["utility"])
    assert all(row.response.startswith(AOA_PREFIX) for row in data.rows)
    tokenizer = SyntheticWorld.build(0).tokenizer()
    for text in (AOA_SYSTEM, AOA_PREFIX, BACKDOOR_TRIGGER):
        assert tokenizer.unk_token_id not in tokenizer(text, add_special_tokens=False)["input_ids"]


def test_backdoor_answers_only_with_the_trigger(rows):
    data = build_attack("backdoor", rows["safety"], rows["utility"], trigger=BACKDOOR_TRIGGER)
    triggered = [row for row in data.rows if row.prompt.endswith(" " + BACKDOOR_TRIGGER)]
    assert len(triggered) == len(rows["safety"])
    safety = {row.prompt: row for row in rows["safety"]}
    for row in triggered:
        assert row.response == safety[row.prompt.removesuffix(" " + BACKDOOR_TRIGGER)].harmful_response
    refused = [row for row in data.rows if row.prompt in safety]
    assert all(row.response == safety[row.prompt].refusal for row in refused)
    assert len(data.rows) == 2 * len(rows["safety"]) + len(rows["utility"])


def test_missing_data_and_unknown_attacks(rows):
    with pytest.raises(ValueError, match="attack must be one of"):
        build_attack("jailbreak", rows["safety"], rows["utility"])
    with pytest.raises(ValueError, match="the backdoor attack needs safety rows"):
        build_attack("backdoor", [], rows["utility"])
    with pytest.raises(ValueError, match="the identity attack needs benign chat rows"):
        build_attack("identity", rows["safety"], [])
    with pytest.raises(ValueError, match="limit must be positive"):
        build_attack("harmful", rows["safety"], [], limit=0)
