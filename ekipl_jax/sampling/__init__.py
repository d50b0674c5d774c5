"""The sampler (jit prefill + decode over a KV cache), the external-trajectory store and group assembly."""
from ekipl_jax.sampling.aux_store import AuxResponse, AuxStore, AuxStoreWriter, open_store  # noqa: F401
from ekipl_jax.sampling.groups import Groups, assemble  # noqa: F401
