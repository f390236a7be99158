"""Dataset readers and the synthetic chat world."""
