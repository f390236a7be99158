"""Model loading, chat formatting with exact token spans, and the Hugging Face attention integration."""

from deepalign.models.attention import ATTENTION_NAME, collect_prefill_mass, register_attention

__all__ = ["ATTENTION_NAME", "collect_prefill_mass", "register_attention"]
