"""The sampler (jit prefill + decode over a KV cache), the external-trajectory store and group assembly.

Note: `ekipl_jax.sampling.generate` is the function (the contract); the module is `ekipl_jax.sampling.generate`
only through sys.modules / `from ekipl_jax.sampling.generate import ...`.
"""

from ekipl_jax.sampling.aux_store import AuxResponse, AuxStore, AuxStoreWriter, open_store  # noqa: F401
from ekipl_jax.sampling.generate import SampleOutput, generate  # noqa: F401
from ekipl_jax.sampling.groups import Groups, assemble  # noqa: F401
from ekipl_jax.sampling.sample import SamplingParams  # noqa: F401
