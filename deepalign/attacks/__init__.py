"""Prefilling, Rank-Assisted Prefilling (RAP / AutoRAP) and decoding-parameter attacks."""
