"""A model that cannot be saved (loaded straight from a GGUF file, so it keeps transformers' GGUF
quantizer) is refused before the first training step, not after the last one; a converted GGUF
model trains and saves."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from deepalign.data.rows import UtilityExample
from deepalign.errors import InputError
from deepalign.models.loading import load_pretrained, tiny_random_model
from deepalign.training.recipes import SFTRecipe
from deepalign.training.trainer import Trainer, TrainerConfig
from tests.models.tiny_gguf import write_tiny_gguf


class CountingRecipe:
    """Wraps a recipe and counts its loss computations (training steps that ran)."""

    def __init__(self, recipe):
        self.recipe, self.name, self.calls = recipe, recipe.name, 0

    def sample(self, rng, batch_size):
        return self.recipe.sample(rng, batch_size)

    def longest(self):
        return self.recipe.longest()

    def loss_terms(self, model, batch):
        self.calls += 1
        return self.recipe.loss_terms(model, batch)


class UnserializableQuantizer:
    def __init__(self, method, gguf_file=None):
        self.quantization_config = SimpleNamespace(quant_method=method, gguf_file=gguf_file)

    def is_serializable(self, safe_serialization=None):
        return False


def settings(tmp_path):
    return TrainerConfig(output_dir=str(tmp_path / "run"), steps=2, batch_size=2, checkpoint_every=1, progress=False)


def test_a_quantizer_that_cannot_save_is_refused_before_any_step(tokenizer, tmp_path):
    recipe = CountingRecipe(SFTRecipe(tokenizer, [UtilityExample("how do i make tea ?", "boil water .")]))
    model = tiny_random_model(vocab_size=len(tokenizer))
    model.hf_quantizer = UnserializableQuantizer("gguf", "model.Q4_K_M.gguf")
    with pytest.raises(InputError, match=r"^the model was loaded quantized \(gguf\) and cannot be saved; convert it "
                                         r"first: deepalign convert model.Q4_K_M.gguf"):
        Trainer(model, tokenizer, recipe, settings(tmp_path)).train()
    model.hf_quantizer = UnserializableQuantizer("bitsandbytes")
    with pytest.raises(InputError, match=r"quantized \(bitsandbytes\) and cannot be saved; load it without quant"):
        Trainer(model, tokenizer, recipe, settings(tmp_path))
    assert recipe.calls == 0
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_gguf_loaded_directly_is_refused_and_its_conversion_trains_and_saves(tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPALIGN_CACHE", str(tmp_path / "cache"))
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    model, tokenizer = load_pretrained(gguf, convert=False)
    recipe = CountingRecipe(SFTRecipe(tokenizer, [UtilityExample("the cat", "the the cat")]))
    with pytest.raises(InputError, match=f"cannot be saved; convert it first: deepalign convert {gguf}"):
        Trainer(model, tokenizer, recipe, settings(tmp_path))
    assert recipe.calls == 0 and not (tmp_path / "run").exists()

    model, tokenizer = load_pretrained(gguf)  # converted once into the cache
    history = Trainer(model, tokenizer, recipe, settings(tmp_path)).train()
    assert [row["step"] for row in history] == [1, 2] and recipe.calls == 2
    trained, _ = load_pretrained(tmp_path / "run" / "final")
    assert (tmp_path / "run" / "checkpoint-1" / "model.safetensors").is_file()
    assert getattr(trained, "hf_quantizer", None) is None
