"""RL: variant registry -> EKIPL group selection -> advantages -> update batch -> GRPO loss -> jit update step (read in
that order)."""

from ekipl_jax.rl import advantages, batch, config, loss, registry, selection, update

__all__ = ["advantages", "batch", "config", "loss", "registry", "selection", "update"]
