"""The RL trainer: the loop (loop.py), checkpoints, metrics logging."""
