"""Imports run forward (docs/DESIGN.md): no module of ekipl_jax imports one of a later stage, and the library never
imports configs/ or experiments/. Every import statement counts, the ones inside functions too (read with ast)."""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The stages in the order docs/DESIGN.md states them; a module may import its own stage and earlier ones.
STAGES = (
    "ekipl_jax.sharding ekipl_jax.tpu_flags",  # the mesh and the TPU compiler flags, used by every stage
    "ekipl_jax.data",  # TFDS builders, processor, tokenizer, aux store and its writers
    "ekipl_jax.models",  # the policy
    "ekipl_jax.sampling",  # sampler, group assembly
    "ekipl_jax.rewards",
    "ekipl_jax.train_state",  # the jit steps' state, shared by SFT and RL
    "ekipl_jax.rl.registry ekipl_jax.rl.config ekipl_jax.rl.batch",
    "ekipl_jax.rl.selection",
    "ekipl_jax.rl.advantages",
    "ekipl_jax.rl.loss",
    "ekipl_jax.rl.update ekipl_jax.rl",  # the update step; the rl package (and a module not listed above) last
    # train/: the parts of a run, then the SFT step, the RL step's stages, the loop, the trainer (and the package)
    "ekipl_jax.train.metrics ekipl_jax.train.state_checkpoint ekipl_jax.train.workdir ekipl_jax.train.validate "
    "ekipl_jax.train.input_pipeline ekipl_jax.train.batching ekipl_jax.train.policy ekipl_jax.train.evaluate "
    "ekipl_jax.train.report",
    "ekipl_jax.train.sft",
    "ekipl_jax.train.rl_stages",
    "ekipl_jax.train.loop",
    "ekipl_jax.train.trainer ekipl_jax.train",
)
OUTSIDE = ("configs", "experiments")  # never imported by the library
APART = (("ekipl_jax.train.sft", "ekipl_jax.rl"),)  # (a, b): a imports nothing of b (SFT knows nothing of RL)


def stage(module: str) -> int:
  """Index in STAGES of the longest prefix naming `module` (a package __init__ has no stage of its own: -1)."""
  best, rank = "", -1
  for i, names in enumerate(STAGES):
    for name in names.split():
      if (module == name or module.startswith(name + ".")) and len(name) > len(best):
        best, rank = name, i
  return rank


def modules() -> dict[str, str]:
  """Dotted name -> source text of every module of the package."""
  out = {}
  for folder, _, files in os.walk(os.path.join(ROOT, "ekipl_jax")):
    for f in sorted(files):
      if f.endswith(".py"):
        path = os.path.join(folder, f)
        name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        out[name.removesuffix(".__init__")] = open(path, encoding="utf-8").read()
  return out


def imports(source: str, known: set[str]) -> set[str]:
  """The ekipl_jax / configs / experiments modules a source imports (`from a import b`: a.b when that is a module)."""
  out = set()
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      out |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module for a in node.names}
  return {m for m in out if m.split(".")[0] in ("ekipl_jax",) + OUTSIDE}


def backward_imports(sources: dict[str, str]) -> list[str]:
  known = set(sources)
  bad = []
  for name, source in sorted(sources.items()):
    for target in sorted(imports(source, known)):
      if target.split(".")[0] in OUTSIDE:
        bad.append(f"{name} imports {target} (the library never imports {'/'.join(OUTSIDE)})")
      elif target.startswith(name + "."):
        continue  # a package re-exporting its own modules
      elif any(name.startswith(a) and (target == b or target.startswith(b + ".")) for a, b in APART):
        bad.append(f"{name} imports {target} (kept apart: {APART})")
      elif stage(name) >= 0 and stage(target) > stage(name):
        bad.append(f"{name} (stage {STAGES[stage(name)]}) imports {target} (later stage {STAGES[stage(target)]})")
  return bad


def test_every_module_has_a_stage():
  unplaced = [m for m in modules() if stage(m) < 0 and m != "ekipl_jax"]  # the top-level __init__ has none
  assert not unplaced, f"{unplaced}: give each a stage in STAGES (and in docs/DESIGN.md's order)"
  assert stage("ekipl_jax.train.new_module") == STAGES.index("ekipl_jax.train.trainer ekipl_jax.train")


def test_imports_run_forward():
  assert backward_imports(modules()) == []


@pytest.mark.parametrize(
    "module,source,message",
    [
        ("ekipl_jax.data.x", "def f():\n  from ekipl_jax.sampling import sampler\n", "later stage ekipl_jax.sampling"),
        ("ekipl_jax.rl.loss", "from ekipl_jax.rl import update\n", "later stage ekipl_jax.rl.update"),
        ("ekipl_jax.models.x", "import ekipl_jax.train.trainer as t\n", "later stage ekipl_jax.train"),
        ("ekipl_jax.train.x", "from configs import base\n", "the library never imports configs/experiments"),
        (
            "ekipl_jax.train.evaluate",
            "from ekipl_jax.train import rl_stages\n",
            "later stage ekipl_jax.train.rl_stages",
        ),
        ("ekipl_jax.train.sft", "from ekipl_jax.rl import update\n", "kept apart"),
    ],
)
def test_a_backward_import_is_reported(module, source, message):
  sources = modules()
  sources[module] = source
  (bad,) = backward_imports(sources)
  assert bad.startswith(module) and message in bad, bad
