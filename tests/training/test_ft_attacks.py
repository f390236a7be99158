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


def test_the_authors_data_files_read_as_they_are(tmp_path):
    """Qi et al.'s layouts: chat 'messages' (pure_bad100 / backdoor / aoa_100), safety-augmentation
    triplets with instruction + input, Alpaca rows in one JSON array."""
    import json

    from deepalign.data.rows import SafetyExample, UtilityExample, read_rows, rows_system
    from deepalign.errors import FileFormatError

    messages = tmp_path / "aoa.jsonl"
    messages.write_text("".join(json.dumps({"messages": [{"role": "system", "content": "Be AOA."},
                                                         {"role": "user", "content": f"q{i}"},
                                                         {"role": "assistant", "content": f"a{i}"}]}) + "\n"
                                for i in range(2)))
    assert read_rows(messages, UtilityExample) == [UtilityExample("q0", "a0"), UtilityExample("q1", "a1")]
    assert rows_system(messages) == "Be AOA."
    triplets = tmp_path / "safety.jsonl"
    triplets.write_text(json.dumps({"instruction": "Do X", "input": "with Y", "harmful": "h", "refusal": "r"}) + "\n")
    assert read_rows(triplets, SafetyExample) == [SafetyExample("Do X\n\nwith Y", "h", "r")]
    alpaca = tmp_path / "anchor.json"
    alpaca.write_text(json.dumps([{"instruction": "Add", "input": "", "output": "2"}, {"instruction": "Sub",
                                                                                       "output": "0"}]))
    assert read_rows(alpaca, UtilityExample) == [UtilityExample("Add", "2"), UtilityExample("Sub", "0")]
    alpaca.write_text(json.dumps([{"instruction": "Add", "output": ""}]))
    with pytest.raises(FileFormatError, match=r"anchor.json: item 1: a field of this UtilityExample row is missing"):
        read_rows(alpaca, UtilityExample)
    messages.write_text(json.dumps({"messages": [{"role": "system", "content": "A"}, {"role": "user", "content": "q"},
                                                 {"role": "assistant", "content": "a"}]}) + "\n"
                        + json.dumps({"messages": [{"role": "system", "content": "B"}, {"role": "user", "content": "q"},
                                                   {"role": "assistant", "content": "a"}]}) + "\n")
    with pytest.raises(FileFormatError, match="2 different system prompts"):
        rows_system(messages)


def test_train_a_fine_tuning_attack_from_the_authors_file(tmp_path, capsys):
    import json

    from deepalign.cli import main

    world = tmp_path / "w"
    assert main(["world", "--output", str(world)]) == 0
    rows = [json.loads(line) for line in (world / "harmful_sft.jsonl").read_text().splitlines()][:4]
    attack = tmp_path / "pure_bad.jsonl"
    attack.write_text("".join(json.dumps({"messages": [{"role": "user", "content": r["prompt"]},
                                                       {"role": "assistant", "content": r["response"]}]}) + "\n"
                              for r in rows))
    assert main(["train", "--recipe", "ft-attack", "--attack", "harmful", "--attack-data", str(attack), "--model",
                 str(world / "model"), "--output", str(tmp_path / "out"), "--steps", "2", "--batch-size", "2",
                 "--lr", "1e-3"]) == 0
    assert "trained ft-attack for 2 steps" in capsys.readouterr().out
