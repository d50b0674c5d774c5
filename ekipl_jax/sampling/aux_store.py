"""The external-trajectory store lives in ekipl_jax/data/aux_store.py (next to its writers, so that imports run
forward: data -> sampling); this name re-exports it for the sampler and existing imports."""

from ekipl_jax.data.aux_store import *  # noqa: F401,F403
from ekipl_jax.data.aux_store import AuxStoreError, ContaminationError, RefuseIds, check_refused  # noqa: F401
