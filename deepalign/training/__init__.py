"""Training losses and recipes (DA, PRESTO, token-wise constrained, [CLS]) and the trainer."""
