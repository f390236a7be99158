"""deepalign: deep safety alignment research on chat language models."""

__version__ = "0.1.0"
