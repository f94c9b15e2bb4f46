"""Training early-exit models: losses, data batches, the training loop, checkpoints."""
