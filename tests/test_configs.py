"""Experiment configs: every paper / ablation variant loads, sets only fields configs/base.py defines (with the same
types), carries Reason-RFT's values (docs/METHOD.md sect. 5), and the trainer's command line rejects unknown keys."""

import ast
import os
import subprocess
import sys

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from configs import ablations, base, demo, paper

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _flat(c: ml_collections.ConfigDict, prefix: str = "") -> dict[str, type]:
  out = {}
  for k, v in c.items():
    if isinstance(v, ml_collections.ConfigDict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = type(v)
  return out


BASE = _flat(base.get_config())


def _same_fields_as_base(c):
  flat = _flat(c)
  assert set(flat) == set(BASE), set(flat) ^ set(BASE)
  for k, t in flat.items():
    if BASE[k] is not type(None) and t is not type(None):
      assert t is BASE[k] or (BASE[k] is float and t is int), (k, t, BASE[k])


@pytest.mark.parametrize("arg", paper.VARIANTS)
def test_paper_variant_loads_with_base_fields_only(arg):
  c = paper.get_config(arg)
  _same_fields_as_base(c)
  model, task, method = arg.split(",")
  assert c.name == f"{model}_{task}_{method}"
  assert c.stage == ("sft" if method == "sft" else "rl")
  assert c.data.builder_config == c.data.task == task
  assert (c.rl.selection, bool(c.aux.store), len(c.aux.sources)) == (
      ("ekipl", True, 2) if method == "ekipl" else ("none", False, 0)
  )


@pytest.mark.parametrize("arg", ablations.VARIANTS + ("qwen2_5_vl_7b,spatial,g=4,k=2,treatment=rlplus",))
def test_ablation_variant_loads_with_base_fields_only(arg):
  _same_fields_as_base(ablations.get_config(arg))


def test_paper_values_follow_reason_rft():
  c = paper.get_config("qwen2_vl_2b,counting,ekipl")
  r = c.rl
  assert (r.group_size, r.num_policy_samples, r.sampling.max_new_tokens) == (8, 8, 512)
  assert max(c.data.prompt_buckets) == 4096 and c.data.max_pixels == 480000
  assert (r.optimizer.lr, r.beta, r.kl_estimator, r.mu, r.adv_eps) == (1e-6, 0.04, "k3", 1, 1e-4)
  assert (r.sampling.temperature, r.sampling.top_p, r.sampling.top_k) == (0.9, 0.9, 50)
  assert c.model.compute_dtype == "bfloat16"
  assert (c.eval.temperature, c.eval.top_p, c.eval.top_k, c.eval.max_new_tokens) == (0.1, 0.9, 50, 768)
  # Epochs: 1 for counting and spatial, 5 for structure, over the nominal training-set sizes.
  for task, size, epochs in (("counting", 35_000, 1), ("structure", 4_500, 5), ("spatial", 60_000, 1)):
    steps = paper.get_config(f"qwen2_vl_7b,{task},grpo").rl.steps
    assert steps == -(-size * epochs // r.batch_prompts)
  s = paper.get_config("qwen2_5_vl_3b,structure,sft")
  assert (s.sft.num_examples, s.sft.lr, s.sft.warmup_steps, s.sft.weight_decay) == (1600, 1e-5, 100, 0.1)
  assert s.model.init_from.endswith("Qwen2.5-VL-3B-Instruct") and s.model.family == "qwen2_5_vl"
  assert paper.get_config("qwen2_5_vl_3b,structure,ekipl").model.init_from == "runs/qwen2_5_vl_3b_structure_sft/hf"


def _assigned_fields(path: str, func: str = "get_config") -> list[str]:
  """Dotted config fields (`c.rl.steps` -> "rl.steps") that `func` in the file at `path` assigns."""
  tree = ast.parse(open(path).read())
  body = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == func)
  out = []
  for node in ast.walk(body):
    for target in node.targets if isinstance(node, ast.Assign) else ():
      for t in target.elts if isinstance(target, ast.Tuple) else (target,):
        parts = []
        while isinstance(t, ast.Attribute):
          parts.insert(0, t.attr)
          t = t.value
        if isinstance(t, ast.Name) and t.id == "c" and parts:
          out.append(".".join(parts))
  return out


def test_paper_sets_only_what_differs_from_base():
  """configs/paper.py restates no value of configs/base.py: every field it sets differs from base in some variant."""
  fields = _assigned_fields(os.path.join(ROOT, "configs", "paper.py"))
  assert "rl.steps" in fields and "model.compute_dtype" in fields  # the parse found the assignments
  b = base.get_config()
  configs = [paper.get_config(arg) for arg in paper.VARIANTS]
  get = lambda c, f: c[f.split(".")[0]] if "." not in f else get(c[f.split(".")[0]], f.split(".", 1)[1])
  restated = [f for f in fields if all(get(c, f) == get(b, f) for c in configs)]
  assert not restated, f"configs/paper.py sets these to configs/base.py's value in every variant: {restated}"


def test_ablation_knobs():
  assert ablations.get_config("m=1").aux.sources == ("gpt-4o",)
  assert len(ablations.get_config("m=3").aux.sources) == 3
  g = ablations.get_config("g=4,n=6")
  assert (g.rl.group_size, g.rl.num_policy_samples) == (4, 6)
  none = ablations.get_config("selection=none")
  assert (none.rl.selection, none.aux.store) == ("none", "")
  imp = ablations.get_config("treatment=importance")
  assert imp.rl.external_treatment == "importance" and imp.aux.behaviour_tokenizer == ablations.EXTERNAL_CHECKPOINT
  assert ablations.get_config("k=2").name == "qwen2_vl_2b_counting_ekipl_k2"
  with pytest.raises(ValueError, match="unknown knob"):
    ablations.get_config("lr=1")
  with pytest.raises(ValueError, match="MODEL,TASK,METHOD"):
    paper.get_config("qwen2_vl_2b,counting")


def test_configs_are_locked_against_new_keys():
  with pytest.raises(AttributeError, match="cannot be added"):
    paper.get_config("qwen2_vl_2b,counting,grpo").rl.nonexistent = 1


def test_config_file_arg_syntax():
  """`--config configs/paper.py:MODEL,TASK,METHOD` as experiments/train.py parses it, overrides included."""

  def parse(*argv):
    fv = flags.FlagValues()
    argv = ["train", *argv]
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=argv)
    fv(argv)
    return fv.config

  c = parse(f"--config={ROOT}/configs/paper.py:qwen2_5_vl_7b,spatial,ekipl", "--config.rl.beta=0.0")
  assert c.name == "qwen2_5_vl_7b_spatial_ekipl" and c.rl.beta == 0.0
  c = parse(f"--config={ROOT}/configs/ablations.py:qwen2_vl_7b,structure,m=1,treatment=luffy")
  assert c.aux.sources == ("gpt-4o",) and c.rl.external_treatment == "luffy"


def test_demo_config_has_base_fields_only():
  flat = _flat(demo.get_config())
  assert set(flat) - {k for k in flat if k.startswith("model.arch.")} == set(BASE)


def test_train_rejects_unknown_key():
  p = subprocess.run(
      [
          sys.executable,
          os.path.join(ROOT, "experiments", "train.py"),
          "--config",
          os.path.join(ROOT, "configs", "demo.py"),
          "--config.nonexistent=1",
      ],
      capture_output=True,
      text=True,
      timeout=120,
      cwd=ROOT,
  )
  assert p.returncode != 0
  assert "nonexistent" in p.stderr
