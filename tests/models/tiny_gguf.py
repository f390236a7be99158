"""A tiny Llama GGUF file written with the ``gguf`` package's own writer (``gguf.GGUFWriter``), so
that GGUF loading and conversion are tested in a second, not in the minute a real model takes.

The file holds a 2-layer Llama (hidden size 64, 4 heads, 2 KV heads) with Q8_0-quantized
matrices (so loading it really de-quantises), float32 norms, an untied output matrix, a byte-level
BPE vocabulary of 261 tokens with three merges, ChatML special tokens and a chat template.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _byte_level_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values (the byte-level BPE alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = dict(zip(printable, printable)), 0
    for byte in range(256):
        if byte not in codes:
            codes[byte], extra = 256 + extra, extra + 1
    return [chr(codes[byte]) for byte in range(256)]


def _permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """Hugging Face's q/k row order → llama.cpp's (as llama.cpp's convert_hf_to_gguf does)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2) \
        .reshape(weight.shape)


def write_tiny_gguf(path: str | Path, *, seed: int = 0, hidden: int = 64, layers: int = 2, heads: int = 4,
                    kv_heads: int = 2, ffn: int = 128) -> Path:
    import gguf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokens = _byte_level_alphabet() + ["Ġt", "he", "Ġthe", "<|im_start|>", "<|im_end|>"]
    vocab, head_dim = len(tokens), hidden // heads
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(vocab)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * (vocab - 2) + [3, 3])
    writer.add_token_merges(["Ġ t", "h e", "Ġt he"])
    writer.add_bos_token_id(vocab - 2)
    writer.add_eos_token_id(vocab - 1)
    writer.add_pad_token_id(vocab - 1)
    writer.add_chat_template(CHAT_TEMPLATE)

    def matrix(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * 0.1).astype(np.float32)

    def quantized(name: str, weight: np.ndarray) -> None:
        kind = gguf.GGMLQuantizationType.Q8_0
        writer.add_tensor(name, gguf.quants.quantize(weight, kind), raw_dtype=kind)

    def norm(name: str) -> None:
        writer.add_tensor(name, (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32))

    quantized("token_embd.weight", matrix(vocab, hidden))
    for i in range(layers):
        norm(f"blk.{i}.attn_norm.weight")
        quantized(f"blk.{i}.attn_q.weight", _permute(matrix(heads * head_dim, hidden), heads))
        quantized(f"blk.{i}.attn_k.weight", _permute(matrix(kv_heads * head_dim, hidden), kv_heads))
        quantized(f"blk.{i}.attn_v.weight", matrix(kv_heads * head_dim, hidden))
        quantized(f"blk.{i}.attn_output.weight", matrix(hidden, heads * head_dim))
        norm(f"blk.{i}.ffn_norm.weight")
        quantized(f"blk.{i}.ffn_gate.weight", matrix(ffn, hidden))
        quantized(f"blk.{i}.ffn_up.weight", matrix(ffn, hidden))
        quantized(f"blk.{i}.ffn_down.weight", matrix(hidden, ffn))
    norm("output_norm.weight")
    quantized("output.weight", matrix(vocab, hidden))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
