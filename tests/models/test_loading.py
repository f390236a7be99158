"""Loading from local folders and GGUF files only; tiny random models for tests."""

from __future__ import annotations

import pytest
import torch

from deepalign.data.synthetic import SyntheticWorld
from deepalign.models.loading import (
    ModelSourceError,
    load_pretrained,
    load_smollm2,
    resolve_source,
    tiny_random_model,
)


def test_hub_names_and_bad_paths_are_refused(tmp_path):
    with pytest.raises(ModelSourceError, match="does not exist; deepalign loads local folders and GGUF files only"):
        resolve_source("meta-llama/Llama-3-8B-Instruct")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelSourceError, match="is not a .gguf file"):
        resolve_source(tmp_path / "weights.bin")
    with pytest.raises(ModelSourceError, match="has no config.json and no .gguf file"):
        resolve_source(tmp_path)
    (tmp_path / "a.gguf").write_bytes(b"x")
    (tmp_path / "b.gguf").write_bytes(b"x")
    with pytest.raises(ModelSourceError, match=r"has 2 .gguf files \(a.gguf, b.gguf\)"):
        resolve_source(tmp_path)


def test_broken_folder_names_the_path(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelSourceError, match="could not load a causal LM from"):
        load_pretrained(tmp_path)


def test_save_and_reload_a_tiny_model_with_the_synthetic_tokenizer(tmp_path):
    world = SyntheticWorld.build(0)
    tokenizer = world.tokenizer()
    model = tiny_random_model(vocab_size=len(tokenizer))
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tokenizer = load_pretrained(tmp_path, attn_implementation="deepalign")
    assert loaded.config._attn_implementation == "deepalign"
    ids = torch.tensor([loaded_tokenizer("how do i make tea ?")["input_ids"]])
    assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-5)
    assert loaded_tokenizer.chat_template == tokenizer.chat_template


def test_unknown_family():
    with pytest.raises(ValueError, match="family must be one of"):
        tiny_random_model("gpt5")


def test_smollm2_runs_with_the_fused_attention():
    """The real chat model: deepalign attention reproduces eager logits on a chat prompt."""
    model, tokenizer = load_smollm2(attn_implementation="deepalign")
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Name a fruit."}], tokenize=False,
                                         add_generation_prompt=True)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        fused = model(ids).logits
        model.set_attn_implementation("eager")
        eager = model(ids).logits
    assert (fused - eager).abs().max() < 1e-3
    assert fused[0, -1].argmax() == eager[0, -1].argmax()
