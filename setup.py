"""ekipl_jax: Vision-EKIPL (GRPO with external knowledge) for Qwen-VL policies in JAX."""

import setuptools

setuptools.setup(
    name="ekipl_jax",
    version="0.1.0",
    description="Vision-EKIPL: RL of vision-language models with external knowledge, in JAX",
    # configs/ is installed too, so `from configs import base` (in configs/*.py, experiments/) needs no sys.path edit.
    packages=setuptools.find_packages(include=["ekipl_jax", "ekipl_jax.*", "configs"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "ml-collections>=1.1.0",
        "transformers>=5.0",
        "tensorflow-datasets>=4.9.10",
        "grain>=0.2.18",  # the training input pipeline (train/input_pipeline.py): batches prepared ahead of the step
        "tensorflow-cpu>=2.21; platform_machine == 'x86_64'",
        "importlib_resources",
        "math-verify>=0.9.0",
        "safetensors",
        "tokenizers",
        "pillow",
        "numpy",
        "jinja2",  # transformers renders chat templates with it
        "absl-py",
        "tqdm",
        "tensorboardX",
        "matplotlib",
    ],
    extras_require={
        # torch (CPU) builds the transformers reference models the tests compare against.
        "test": ["torch==2.13.0", "pytest", "pytest-xdist", "chex", "nbclient", "nbformat", "ipykernel", "openai"],
        # experiments/precompute_aux.py --source=openai: OpenAI, Gemini's OpenAI-compatible endpoint, vLLM, SGLang.
        "api": ["openai"],
        # peers measured side by side by `make bench` (tunix is installed in its own venv, see Makefile).
        "bench": ["torch==2.13.0"],
    },
)
