"""Training: configs, optimizer, train/eval steps, the loop, checkpoints and metrics."""
