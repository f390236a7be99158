"""Model loading, chat formatting with exact token spans, and the Hugging Face attention integration."""
