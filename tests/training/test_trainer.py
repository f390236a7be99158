"""The trainer: every recipe runs; checkpoints are Hugging Face folders; resume reproduces losses."""

from __future__ import annotations

import json

import pytest
import torch

from deepalign.models.loading import load_pretrained, tiny_random_model
from deepalign.data.rows import SafetyExample, UtilityExample
from deepalign.data.rows import read_rows, write_rows
from deepalign.errors import FileFormatError, InputError, SettingsMismatchError
from deepalign.training.recipes import ConstrainedRecipe, DARecipe, SFTRecipe
from deepalign.training.trainer import Trainer, TrainerConfig, latest_checkpoint
from tests.training.multiprocess_driver import InterruptAfter
from tests.training.multiprocess_driver import Interrupted as Interrupt


def safety_rows(world):
    return [SafetyExample(world.request(i, p), world.compliant_response(i), world.refusal(i, p))
            for i in world.harmful_items() for p in range(2)]


def utility_rows(world):
    return [UtilityExample(world.request(i, p), world.compliant_response(i)) for i in world.benign_items() for p in range(2)]


def model_for(tokenizer, seed=0, attention=None):
    return tiny_random_model(vocab_size=len(tokenizer), seed=seed, attn_implementation=attention)


def config(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path), steps=6, batch_size=4, lr=1e-3, checkpoint_every=3, progress=False)
    values.update(overrides)
    return TrainerConfig(**values)


def test_resume_reproduces_the_loss_sequence(world, tokenizer, tmp_path):
    recipe = lambda: DARecipe(tokenizer, safety_rows(world), utility_rows(world))  # noqa: E731
    reference = Trainer(model_for(tokenizer), tokenizer, recipe(), config(tmp_path / "a")).train()
    interrupted = Trainer(model_for(tokenizer), tokenizer, InterruptAfter(recipe(), 5), config(tmp_path / "b"))
    with pytest.raises(Interrupt):
        interrupted.train()
    assert latest_checkpoint(tmp_path / "b").name == "checkpoint-3"
    resumed = Trainer(model_for(tokenizer, seed=99), tokenizer, recipe(), config(tmp_path / "b")).train()
    assert [row["step"] for row in resumed] == list(range(1, 7))
    assert [row["loss"] for row in resumed] == [row["loss"] for row in reference]
    on_disk = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [row["loss"] for row in on_disk] == [row["loss"] for row in reference]


def test_every_recipe_trains_and_writes_a_loadable_model(world, tokenizer, tmp_path):
    safety, utility = safety_rows(world), utility_rows(world)
    refusals = [UtilityExample(row.prompt, row.refusal) for row in safety]
    recipes = {
        "sft": (SFTRecipe(tokenizer, refusals + utility), None),
        "da": (DARecipe(tokenizer, safety, utility), None),
        "presto": (DARecipe(tokenizer, safety, utility, presto_weight=1.0), "deepalign"),
        "constrained": (ConstrainedRecipe(tokenizer, utility, model_for(tokenizer), progress=False), None),
    }
    for name, (recipe, attention) in recipes.items():
        output = tmp_path / name
        history = Trainer(model_for(tokenizer, attention=attention), tokenizer, recipe,
                          config(output, steps=8, checkpoint_every=4)).train()
        assert recipe.name == name
        assert len(history) == 8 and all(torch.isfinite(torch.tensor(row["loss"])) for row in history)
        if name == "presto":
            assert "presto" in history[0] and "nll" in history[0]
        if name == "constrained":  # starts at the reference: constrained loss = 2/β·log 2 averaged
            assert history[0]["constrained"] > 0
        assert history[-1]["loss"] < history[0]["loss"]
        model, _ = load_pretrained(output / "final")
        assert model.config.vocab_size == len(tokenizer)


def test_presto_needs_the_fused_attention(world, tokenizer, tmp_path):
    recipe = DARecipe(tokenizer, safety_rows(world), utility_rows(world), presto_weight=1.0)
    with pytest.raises(ValueError, match="presto needs the model loaded with attn_implementation='deepalign'"):
        Trainer(model_for(tokenizer, attention="eager"), tokenizer, recipe, config(tmp_path)).train()


def test_bad_configs_and_resuming_another_recipe(world, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        config(tmp_path, batch_size=0)
    with pytest.raises(ValueError, match=r"warmup_steps must be in \[0, steps = 6\)"):
        config(tmp_path, warmup_steps=6)
    with pytest.raises(ValueError, match="safety_fraction must be in"):
        DARecipe(tokenizer, safety_rows(world), utility_rows(world), safety_fraction=0.0)
    Trainer(model_for(tokenizer), tokenizer, SFTRecipe(tokenizer, utility_rows(world)), config(tmp_path, steps=3)).train()
    with pytest.raises(SettingsMismatchError, match="recipe: 'sft' → 'da'"):
        Trainer(model_for(tokenizer), tokenizer, DARecipe(tokenizer, safety_rows(world), utility_rows(world)),
                config(tmp_path, steps=3)).train()


def test_resuming_with_changed_settings_is_refused_naming_each(world, tokenizer, tmp_path):
    recipe = lambda: SFTRecipe(tokenizer, utility_rows(world))  # noqa: E731
    Trainer(model_for(tokenizer), tokenizer, recipe(), config(tmp_path, steps=2, lr=1e-3)).train()
    with pytest.raises(SettingsMismatchError) as info:
        Trainer(model_for(tokenizer), tokenizer, recipe(), config(tmp_path, steps=4, lr=0.5, batch_size=3)).train()
    message = str(info.value)
    for change in ("batch_size: 4 → 3", "lr: 0.001 → 0.5", "steps: 2 → 4"):
        assert change in message
    assert "another output folder" in message
    with pytest.raises(SettingsMismatchError, match=r"settings \(data: 'a' → 'b'\)"):
        Trainer(model_for(tokenizer), tokenizer, recipe(), config(tmp_path / "r", steps=2, run_settings={"data": "a"})
                ).train()
        Trainer(model_for(tokenizer), tokenizer, recipe(), config(tmp_path / "r", steps=2, run_settings={"data": "b"})
                ).train()
    # Bookkeeping may change: the same run resumes (and finds nothing left to do).
    again = Trainer(model_for(tokenizer), tokenizer, recipe(), config(tmp_path, steps=2, lr=1e-3, checkpoint_every=1,
                                                                       progress=True)).train()
    assert [row["step"] for row in again] == [1, 2]


def test_a_torn_metrics_line_resumes(world, tokenizer, tmp_path):
    recipe = lambda: SFTRecipe(tokenizer, utility_rows(world))  # noqa: E731
    interrupted = Trainer(model_for(tokenizer), tokenizer, InterruptAfter(recipe(), 5), config(tmp_path))
    with pytest.raises(Interrupt):
        interrupted.train()
    metrics = tmp_path / "metrics.jsonl"
    with metrics.open("a") as handle:
        handle.write('{"step": 6, "lo')  # a kill in the middle of an append
    history = Trainer(model_for(tokenizer), tokenizer, recipe(), config(tmp_path)).train()
    assert [row["step"] for row in history] == list(range(1, 7))
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == list(range(1, 7))
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_data_files_round_trip_and_name_bad_lines(world, tmp_path):
    path = write_rows(tmp_path / "safety.jsonl", safety_rows(world))
    assert read_rows(path, SafetyExample) == safety_rows(world)
    lines = path.read_text().splitlines()
    lines[2] = '{"prompt": "x", "refusal": "no"}'
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(FileFormatError, match=r"safety.jsonl:3: missing or empty field\(s\) harmful_response"):
        read_rows(path, SafetyExample)
    path.write_text('{"prompt": "x", "response": "y"}\n[1, 2]\n')
    with pytest.raises(FileFormatError, match=r"safety.jsonl:2: expected a JSON object"):
        read_rows(path, UtilityExample)
    path.write_text('{"prompt": "x", \n')
    with pytest.raises(FileFormatError, match=r"safety.jsonl:1: not valid JSON"):
        read_rows(path, UtilityExample)
    with pytest.raises(InputError, match="no such data file"):
        read_rows(tmp_path / "missing.jsonl", UtilityExample)


def test_an_example_longer_than_the_context_is_refused_before_training(world, tokenizer, tmp_path):
    rows = safety_rows(world)
    long_row = SafetyExample(rows[0].prompt, " , ".join(["heat oil"] * 60), rows[0].refusal)
    recipe = DARecipe(tokenizer, rows[:3] + [long_row], utility_rows(world))
    model = tiny_random_model(vocab_size=len(tokenizer), max_positions=96)
    with pytest.raises(ValueError, match=r"safety row 4 \(with its longest prefill\) renders to 1\d\d tokens, "
                                         r"longer than the model's context of 96"):
        Trainer(model, tokenizer, recipe, config(tmp_path))


def test_pretrain_recipe_supervises_every_text_token_and_mixes_chat(world, tokenizer, tmp_path):
    from deepalign.training.recipes import PretrainRecipe

    texts = [world.knowledge_text(i) for i in world.items.values()]
    recipe = PretrainRecipe(tokenizer, texts, utility_rows(world), chat_fraction=0.5)
    items = recipe.sample(__import__("random").Random(0), 6)
    plain = [i for i in items if i.spans.input_ids[0] == tokenizer.bos_token_id and len(i.spans.tokens("prompt")) == 1]
    assert len(plain) == 3
    assert all(int(i.loss_mask.sum()) == len(i.spans) - 1 for i in plain)
    history = Trainer(model_for(tokenizer), tokenizer, recipe, config(tmp_path, steps=10)).train()
    assert history[-1]["loss"] < history[0]["loss"]
    with pytest.raises(ValueError, match="chat_fraction must be in"):
        PretrainRecipe(tokenizer, texts, chat_fraction=0.5)


def test_lora_trains_adapters_only_resumes_and_merges(world, tokenizer, tmp_path):
    recipe = lambda: DARecipe(tokenizer, safety_rows(world), utility_rows(world))  # noqa: E731
    base = model_for(tokenizer)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    lora = dict(lora_rank=4)
    reference = Trainer(model_for(tokenizer), tokenizer, recipe(), config(tmp_path / "a", **lora)).train()
    interrupted = Trainer(base, tokenizer, InterruptAfter(recipe(), 4), config(tmp_path / "b", **lora))
    with pytest.raises(Interrupt):
        interrupted.train()
    frozen = {k.replace("base_layer.", ""): v for k, v in interrupted.model.base_model.model.state_dict().items()
              if "lora_" not in k}
    assert set(frozen) == set(before) and all(torch.equal(before[k], frozen[k]) for k in before)
    assert (tmp_path / "b" / "checkpoint-3" / "adapter_model.safetensors").is_file()
    resumed = Trainer(model_for(tokenizer), tokenizer, recipe(), config(tmp_path / "b", **lora)).train()
    assert [row["loss"] for row in resumed] == [row["loss"] for row in reference]
    merged, _ = load_pretrained(tmp_path / "b" / "final")
    changed = [k for k, v in merged.state_dict().items() if not torch.equal(v, before[k])]
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert changed and all(any(t in k for t in targets) for k in changed)


def test_gradient_accumulation_averages_micro_batches(world, tokenizer, tmp_path):
    """grad_accum > 1 runs, logs one row per optimizer step, and learns."""
    recipe = SFTRecipe(tokenizer, utility_rows(world))
    history = Trainer(model_for(tokenizer), tokenizer, recipe, config(tmp_path, batch_size=2, grad_accum=2,
                                                                       steps=8)).train()
    assert len(history) == 8 and history[-1]["loss"] < history[0]["loss"]


def test_restart_without_checkpoint_starts_the_metrics_over_and_no_resume_refuses_old_checkpoints(
        world, tokenizer, tmp_path):
    recipe = lambda: SFTRecipe(tokenizer, utility_rows(world))  # noqa: E731
    crashed = Trainer(model_for(tokenizer), tokenizer, InterruptAfter(recipe(), 2),
                      config(tmp_path, checkpoint_every=50))
    with pytest.raises(Interrupt):
        crashed.train()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    history = Trainer(model_for(tokenizer), tokenizer, recipe(), config(tmp_path, steps=3)).train()
    assert [row["step"] for row in history] == [1, 2, 3]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3
    with pytest.raises(ValueError, match="already holds checkpoints"):
        Trainer(model_for(tokenizer), tokenizer, recipe(), config(tmp_path, steps=3, resume=False)).train()


def test_learning_rate_decays_linearly_per_optimizer_step(world, tokenizer, tmp_path):
    history = Trainer(model_for(tokenizer), tokenizer, SFTRecipe(tokenizer, utility_rows(world)),
                      config(tmp_path, steps=4, lr=1e-3)).train()
    assert [row["lr"] for row in history] == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4])
