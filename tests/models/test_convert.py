"""GGUF files are converted once into a safetensors folder that loads, trains and saves like any other.

Most tests use a tiny Llama GGUF written with the ``gguf`` package (Q8_0 blocks, a second to load);
one test converts the real SmolLM2-135M-Instruct GGUF once, into a temporary cache."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
import torch

from deepalign.cli import main
from deepalign.errors import InputError
from deepalign.models import loading
from deepalign.models.loading import (
    CONVERSION_RECORD,
    ModelSourceError,
    conversion_dir,
    convert_gguf,
    find_conversion,
    load_pretrained,
    resolve_source,
)
from tests.models.tiny_gguf import write_tiny_gguf


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.Q8_0.gguf")


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPALIGN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def no_conversion(*args, **kwargs):
    raise AssertionError("the GGUF file was loaded again")


def logits(model, tokenizer, text="the cat sat on the mat"):
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
        return model(ids).logits


def test_converted_folder_is_plain_safetensors_and_matches_the_direct_load(tiny_gguf, cache, tmp_path):
    model, tokenizer = load_pretrained(tiny_gguf)
    folder = find_conversion(tiny_gguf)
    assert folder is not None and folder.parent == cache / "gguf"
    assert sorted(p.name for p in folder.glob("*.safetensors")) == ["model.safetensors"]
    assert not list(folder.glob("*.gguf"))
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert getattr(model, "hf_quantizer", None) is None and not getattr(model, "is_quantized", False)
    assert loading.saveable_problem(model) is None

    direct, direct_tokenizer = load_pretrained(tiny_gguf, convert=False)
    assert direct.hf_quantizer is not None  # the raw load: what transformers itself gives
    text = direct_tokenizer.apply_chat_template([{"role": "user", "content": "the cat"}], tokenize=False,
                                                add_generation_prompt=True)
    assert tokenizer(text)["input_ids"] == direct_tokenizer(text)["input_ids"]
    assert tokenizer.chat_template == direct_tokenizer.chat_template
    assert (tokenizer.eos_token, tokenizer.bos_token) == (direct_tokenizer.eos_token, direct_tokenizer.bos_token)
    assert model.dtype == torch.float32
    assert (logits(model, tokenizer, text) - logits(direct, direct_tokenizer, text)).abs().max() <= 1e-5

    model.save_pretrained(tmp_path / "saved")  # the point of converting: it can be saved
    assert (tmp_path / "saved" / "model.safetensors").is_file()


def test_conversion_happens_once_and_is_announced_once(tiny_gguf, cache, monkeypatch, capsys):
    first, _ = load_pretrained(tiny_gguf)
    announced = [line for line in capsys.readouterr().err.splitlines() if line.startswith("deepalign:")]
    folder = find_conversion(tiny_gguf)
    assert len(announced) == 1 and "once" in announced[0] and str(folder) in announced[0]

    monkeypatch.setattr(loading, "_load_gguf", no_conversion)
    second, _ = load_pretrained(tiny_gguf)
    assert not [line for line in capsys.readouterr().err.splitlines() if line.startswith("deepalign:")]
    assert resolve_source(tiny_gguf) == (folder, None)
    assert resolve_source(tiny_gguf.parent) == (folder, None)  # a folder holding the one GGUF file
    assert resolve_source(tiny_gguf, convert=False) == (tiny_gguf.parent, tiny_gguf.name)
    assert convert_gguf(tiny_gguf) == folder
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)


def test_the_cache_records_source_and_sha256_and_finds_renamed_copies(tiny_gguf, cache, tmp_path, monkeypatch):
    folder = convert_gguf(tiny_gguf)
    record = json.loads((folder / CONVERSION_RECORD).read_text())
    sha = hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
    assert record["source"] == str(tiny_gguf.resolve()) and record["sha256"] == sha
    assert record["size"] == tiny_gguf.stat().st_size and record["dtype"] == "float32"
    assert folder.name == f"tiny-llama.Q8_0-{sha[:16]}" and folder == conversion_dir(tiny_gguf)

    monkeypatch.setattr(loading, "_load_gguf", no_conversion)
    copy = shutil.copy(tiny_gguf, tmp_path / "renamed.gguf")
    assert find_conversion(copy) == folder  # same bytes: found by the sha256
    os.utime(tiny_gguf, ns=(1, 1))  # touched: hashed again, still the same bytes
    assert find_conversion(tiny_gguf) == folder


def test_the_cache_key_follows_the_content(tmp_path, monkeypatch):
    a, b, c = tmp_path / "m.gguf", tmp_path / "other" / "m.gguf", tmp_path / "n.gguf"
    b.parent.mkdir()
    a.write_bytes(b"GGUF one")
    b.write_bytes(b"GGUF two")
    c.write_bytes(b"GGUF one")
    monkeypatch.setenv("DEEPALIGN_CACHE", str(tmp_path / "cache"))
    assert conversion_dir(a) != conversion_dir(b)  # same name, other bytes
    assert conversion_dir(a).name.split("-")[-1] == conversion_dir(c).name.split("-")[-1]
    assert conversion_dir(a) == tmp_path / "cache" / "gguf" / f"m-{hashlib.sha256(b'GGUF one').hexdigest()[:16]}"
    monkeypatch.delenv("DEEPALIGN_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert conversion_dir(a).parent == tmp_path / "home" / ".cache" / "deepalign" / "gguf"
    assert find_conversion(a) is None


def test_output_folder_a_failed_conversion_and_bad_sources(tiny_gguf, cache, tmp_path, monkeypatch):
    out = convert_gguf(tiny_gguf, tmp_path / "out", announce=False)
    assert out == tmp_path / "out" and (out / CONVERSION_RECORD).is_file()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="output_dir .*busy: exists and is not empty"):
        convert_gguf(tiny_gguf, tmp_path / "busy")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    with pytest.raises(ModelSourceError, match="is a Hugging Face folder .*needs no conversion"):
        convert_gguf(out)

    monkeypatch.setattr(loading, "_load_gguf", no_conversion)
    assert convert_gguf(tiny_gguf, out) == out  # already there: nothing loaded
    monkeypatch.undo()
    monkeypatch.setenv("DEEPALIGN_CACHE", str(cache))

    def broken_save(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(load_pretrained(out)[0]), "save_pretrained", broken_save)
    with pytest.raises(OSError, match="disk full"):
        convert_gguf(tiny_gguf, tmp_path / "half")
    assert not (tmp_path / "half").exists() and not list(tmp_path.glob(".half*tmp"))

    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a gguf file")
    with pytest.raises(ModelSourceError, match="could not load a causal LM from .*broken.gguf"):
        load_pretrained(broken)


def test_the_convert_command(tiny_gguf, cache, tmp_path, capsys):
    assert main(["convert", str(tiny_gguf)]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == str(find_conversion(tiny_gguf))
    assert main(["convert", str(tiny_gguf), "--output", str(tmp_path / "mine")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "mine")
    assert load_pretrained(tmp_path / "mine")[0].config.model_type == "llama"
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", str(tmp_path / "missing.gguf")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "argument GGUF" in error and "missing.gguf: no such GGUF file" in error and len(error.splitlines()) == 1
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert main(["convert", str(tiny_gguf), "--output", str(tmp_path / "full")]) == 2
    assert capsys.readouterr().err.startswith("deepalign convert: --output ")


@pytest.fixture(scope="module")
def smollm2_cache(tmp_path_factory):
    """SmolLM2-135M-Instruct converted once for this module, into a temporary cache."""
    try:
        path = loading.smollm2_path()
    except ModelSourceError as error:
        pytest.skip(str(error))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DEEPALIGN_CACHE", str(tmp_path_factory.mktemp("smollm2-cache")))
        folder = convert_gguf(path)
        yield folder, patch


def test_smollm2_converted_matches_the_gguf_load(smollm2_cache, monkeypatch):
    folder, _ = smollm2_cache
    direct, tokenizer = loading.load_smollm2(convert=False)
    monkeypatch.setattr(loading, "_load_gguf", no_conversion)
    converted, converted_tokenizer = loading.load_smollm2()
    assert find_conversion(loading.smollm2_path()) == folder
    assert getattr(converted, "hf_quantizer", None) is None
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Name a fruit."}], tokenize=False,
                                         add_generation_prompt=True)
    assert converted_tokenizer.chat_template == tokenizer.chat_template
    assert converted_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    a, b = logits(direct, tokenizer, text), logits(converted, converted_tokenizer, text)
    assert (a - b).abs().max() <= 1e-5
    assert a[0, -1].argmax() == b[0, -1].argmax()
