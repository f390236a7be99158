"""Loading from local folders and GGUF files only; tiny random models for tests."""

from __future__ import annotations

import argparse

import pytest
import torch

from deepalign.cli import args as cli_args
from deepalign.data.synthetic import SyntheticWorld
from deepalign.errors import InputError
from deepalign.models.loading import (
    ModelSourceError,
    load_pretrained,
    load_smollm2,
    resolve_device,
    resolve_dtype,
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
    model, tokenizer = load_smollm2(attn_implementation="deepalign", convert=False)  # no cache written by tests
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Name a fruit."}], tokenize=False,
                                         add_generation_prompt=True)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        fused = model(ids).logits
        model.set_attn_implementation("eager")
        eager = model(ids).logits
    assert (fused - eager).abs().max() < 1e-3
    assert fused[0, -1].argmax() == eager[0, -1].argmax()


def test_device_and_dtype_names(tmp_path, monkeypatch):
    assert resolve_device(None) == torch.device("cpu") and resolve_device("cpu") == torch.device("cpu")
    assert resolve_dtype(None) == torch.float32 and resolve_dtype("bfloat16") == torch.bfloat16
    assert resolve_dtype("float16") == torch.float16 and resolve_dtype(torch.float64) == torch.float64
    for bad in ("gpu", "cuda:x", "cpu:0", "CUDA", "", 3):
        with pytest.raises(InputError, match="^device must be one of auto, cpu, cuda, cuda:N, got"):
            resolve_device(bad)
    for bad in ("fp16", "float64", "int8", torch.int64):
        with pytest.raises(InputError, match="^dtype must be"):
            resolve_dtype(bad)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") and resolve_dtype("auto", "auto") == torch.float32
    with pytest.raises(InputError, match="^device is 'cuda:0', but no CUDA GPU is available here"):
        resolve_device("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_device("auto") == torch.device("cuda") and resolve_device("cuda:1") == torch.device("cuda:1")
    assert resolve_dtype("auto", "cuda:1") == torch.bfloat16 and resolve_dtype("auto", "cpu") == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype("auto", "cuda") == torch.float16
    with pytest.raises(InputError, match="^device is 'cuda:2', but this machine has 2 CUDA device"):
        resolve_device("cuda:2")
    with pytest.raises(InputError, match="^dtype must be"):  # checked before the source is looked at
        load_pretrained(tmp_path / "missing", dtype="half")


def test_device_and_dtype_on_a_loaded_model(tmp_path):
    model = tiny_random_model(vocab_size=64)
    model.save_pretrained(tmp_path)
    SyntheticWorld.build(0).tokenizer().save_pretrained(tmp_path)
    loaded, _ = load_pretrained(tmp_path, device="auto", dtype="auto")
    expected = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    assert loaded.dtype == expected and loaded.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert load_pretrained(tmp_path, device="cpu", dtype="bfloat16")[0].dtype == torch.bfloat16


def test_argument_types_for_device_dtype_and_gguf(tmp_path):
    assert cli_args.device("auto") == "auto" and cli_args.device("cpu") == "cpu"
    assert cli_args.dtype("bfloat16") == "bfloat16"
    with pytest.raises(argparse.ArgumentTypeError, match="^must be one of auto, cpu, cuda, cuda:N, got 'gpu'"):
        cli_args.device("gpu")
    with pytest.raises(argparse.ArgumentTypeError, match="^must be one of auto, float32, bfloat16, float16"):
        cli_args.dtype("bf16")
    if not torch.cuda.is_available():
        with pytest.raises(argparse.ArgumentTypeError, match="no CUDA GPU is available"):
            cli_args.device("cuda")
    (tmp_path / "m.gguf").write_bytes(b"x")
    (tmp_path / "m.bin").write_bytes(b"x")
    assert cli_args.gguf_file(str(tmp_path / "m.gguf")) == tmp_path / "m.gguf"
    assert cli_args.gguf_file(str(tmp_path)) == tmp_path / "m.gguf"
    for bad, why in (("m.bin", "is not a .gguf file"), ("no.gguf", "no such GGUF file")):
        with pytest.raises(argparse.ArgumentTypeError, match=why):
            cli_args.gguf_file(str(tmp_path / bad))
