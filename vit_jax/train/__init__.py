"""Training: optimizer, losses, sharding, the jitted step, checkpoints and the loop."""
