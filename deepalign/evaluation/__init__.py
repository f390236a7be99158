"""Judges and scoring."""
