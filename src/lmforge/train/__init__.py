"""The training loop, schedules, checkpoints and the distributed layer."""
