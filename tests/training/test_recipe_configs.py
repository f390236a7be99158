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
EXPECTED = {
    "qi-da-llama2-7b-chat.yaml": ("da", dict(lr=2e-5, batch_size=20, safety_fraction=0.2, epochs=10, warmup_steps=0,
                                           adam_beta1=0.9, weight_decay=0.0, gradient_checkpointing=True)),
    "qi-ft-attack-harmful-sft-llama2-7b-chat.yaml": ("ft-attack", dict(lr=2e-5, batch_size=16, epochs=25,
                                                                       warmup_steps=10, adam_beta1=0.5,
                                                                       objective="sft", attack="harmful")),
    "qi-ft-attack-harmful-constrained-llama2-7b-chat.yaml": ("ft-attack", dict(lr=2e-5, batch_size=16, epochs=25,
                                                                               warmup_steps=10, adam_beta1=0.5,
                                                                               objective="constrained")),
    "vega-singh-presto-llama2-7b-chat.yaml": ("presto", dict(lr=2e-5, batch_size=5, grad_accum=4, safety_fraction=0.2,
                                                             presto_layers="mean", epochs=10, adam_beta1=0.9,
                                                             weight_decay=0.01, warmup_steps=0)),
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
    assert {key: getattr(args, key) for key in values} == values


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
