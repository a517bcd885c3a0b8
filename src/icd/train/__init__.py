"""Training: typed configs, data, checkpoints and the loops for every trained component."""
