"""The paper-run config files under configs/recipes: each sets the values its source names, every key
is a train option, and the command line wins over the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from deepalign.cli import build_parser
from deepalign.cli.train import apply_config, steps_for_epochs
from deepalign.errors import InputError

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "recipes"

# From the authors' released code (see each file's header): Qi et al.'s finetune.py / README runs,
# Vega & Singh's deep_safety_alignment.py defaults.
LLAMA2_SYSTEM = "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while"
QI_DA = dict(lr=2e-5, batch_size=20, safety_fraction=0.2, epochs=10, warmup_steps=0, adam_beta1=0.9, weight_decay=0.0,
             gradient_checkpointing=True, loss_normalisation="micro-batch")
VEGA_SINGH = dict(lr=2e-5, batch_size=5, grad_accum=4, safety_fraction=0.2, epochs=10, adam_beta1=0.9,
                  weight_decay=0.01, warmup_steps=0, loss_normalisation="step")
PRESTO = dict(presto_layers="mean", presto_weight=1.0)
QI_FT = dict(lr=2e-5, batch_size=16, epochs=25, warmup_steps=10, adam_beta1=0.5, loss_normalisation="micro-batch")
EXPECTED = {
    "qi-da-llama2-7b-chat.yaml": ("da", dict(QI_DA, system=LLAMA2_SYSTEM)),
    "qi-da-gemma-1.1-7b-it.yaml": ("da", dict(QI_DA, no_system=True, system=None)),
    "qi-ft-attack-harmful-sft-llama2-7b-chat.yaml": ("ft-attack", dict(QI_FT, objective="sft", attack="harmful")),
    "qi-ft-attack-harmful-constrained-llama2-7b-chat.yaml": ("ft-attack", dict(QI_FT, objective="constrained")),
    "vega-singh-presto-llama2-7b-chat.yaml": ("presto", dict(VEGA_SINGH, **PRESTO, system=LLAMA2_SYSTEM)),
    "vega-singh-da-llama2-7b-chat.yaml": ("da", dict(VEGA_SINGH, system=LLAMA2_SYSTEM, presto_weight=None)),
    "vega-singh-presto-qwen3.yaml": ("presto", dict(VEGA_SINGH, **PRESTO, system=None, no_system=None)),
    "vega-singh-da-qwen3.yaml": ("da", dict(VEGA_SINGH, system=None, presto_weight=None)),
    "vega-singh-presto-gemma3.yaml": ("presto", dict(VEGA_SINGH, **PRESTO, system=None, no_system=None)),
    "vega-singh-da-gemma3.yaml": ("da", dict(VEGA_SINGH, system=None, presto_weight=None)),
}


def parse(tmp_path, recipe, *extra):
    (tmp_path / "m").mkdir(exist_ok=True)
    return build_parser().parse_args(["train", "--recipe", recipe, "--model", str(tmp_path / "m"), "--output",
                                      str(tmp_path / "o"), *extra])


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_config_sets_its_sources_values(tmp_path, name):
    recipe, values = EXPECTED[name]
    args = parse(tmp_path, recipe, "--config", str(CONFIGS / name))
    apply_config(args)
    got = {key: getattr(args, key) for key in values}
    if values.get("system") == LLAMA2_SYSTEM:  # the whole text, read from transformers; its opening checked here
        assert got["system"].startswith(LLAMA2_SYSTEM) and len(got["system"]) == 507
        got["system"] = LLAMA2_SYSTEM
    assert got == values


def test_every_config_file_is_checked():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


def test_the_command_line_wins_and_bad_files_are_named(tmp_path):
    args = parse(tmp_path, "da", "--config", str(CONFIGS / "qi-da-llama2-7b-chat.yaml"), "--lr", "1e-4")
    taken = apply_config(args)
    assert args.lr == 1e-4 and "lr" not in taken and taken["batch_size"] == 20
    with pytest.raises(InputError, match="is a config for --recipe da, not presto"):
        apply_config(parse(tmp_path, "presto", "--config", str(CONFIGS / "qi-da-llama2-7b-chat.yaml")))
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: 2e-5\nlearning_rate: 1\n")
    with pytest.raises(InputError, match=r"bad.yaml: 'learning_rate' is not an option of deepalign train"):
        apply_config(parse(tmp_path, "da", "--config", str(bad)))
    bad.write_text("batch-size: 0\n")
    with pytest.raises(InputError, match=r"bad.yaml: batch-size: must be a positive integer"):
        apply_config(parse(tmp_path, "da", "--config", str(bad)))
    bad.write_text("lr: [1\n")
    with pytest.raises(InputError, match=r"bad.yaml:\d+: not valid YAML"):
        apply_config(parse(tmp_path, "da", "--config", str(bad)))


def test_epochs_become_optimizer_steps(tmp_path, monkeypatch):
    args = parse(tmp_path, "presto", "--config", str(CONFIGS / "vega-singh-presto-llama2-7b-chat.yaml"))
    apply_config(args)
    data = {"safety": [None] * 100, "chat": [None] * 400, "attack_data": [], "texts": []}
    monkeypatch.setenv("WORLD_SIZE", "4")
    # 1 safety row per micro-batch × 4 accumulation × 4 processes = 16 per step: ceil(100 / 16) = 7 per epoch.
    assert steps_for_epochs(args, data) == 10 * 7
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert steps_for_epochs(args, data) == 10 * 25


def test_the_named_llama2_system_prompt_is_transformers_own_on_every_command(tmp_path):
    from transformers.models.llama.tokenization_llama import DEFAULT_SYSTEM_PROMPT

    args = parse(tmp_path, "da", "--system", "llama2-default")
    assert args.system == DEFAULT_SYSTEM_PROMPT
    assert parse(tmp_path, "da", "--system", "Be brief.").system == "Be brief."
    attack = build_parser().parse_args(["attack", "prefill", "--model", str(tmp_path / "m"), "--output",
                                        str(tmp_path / "r.jsonl"), "--system", "llama2-default"])
    assert attack.system == DEFAULT_SYSTEM_PROMPT
