"""RL: EKIPL group selection -> advantages -> GRPO loss -> jit update step (read in that order)."""

from ekipl_jax.rl import advantages, config, loss, selection, update

__all__ = ["advantages", "config", "loss", "selection", "update"]
