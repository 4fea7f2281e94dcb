"""A run: the one training loop, its placements, evaluation, checkpoints, logs and run folders."""
