"""Trainer pieces: checkpoints, metrics, the SFT and RL loops, evaluation."""
