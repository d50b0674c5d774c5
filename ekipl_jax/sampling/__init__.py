"""The sampler (jit prefill + decode over a KV cache) and group assembly.

`ekipl_jax.sampling.generate` is the sampler's entry point (a function, defined in sampling/sampler.py); the external-
trajectory store it reads lives in ekipl_jax/data/aux_store/.
"""

from ekipl_jax.sampling.groups import Groups, assemble  # noqa: F401
from ekipl_jax.sampling.sample import SamplingParams  # noqa: F401
from ekipl_jax.sampling.sampler import SampleOutput, generate  # noqa: F401
