"""experiments/aot.py compiles the demo config's programs for a real TPU topology (v5e:2x2, no TPU needed) in the
.venv-tpu environment (`make install-tpu`; `make test` installs it) and tells a fitting config from an oversized one.

Independent references: XLA's own argument bytes of a program must match (up to TPU tile padding) what the tool
computes from the trainer's shardings; v5e has 16 GiB of HBM per chip (https://cloud.google.com/tpu/docs/v5e),
of which XLA reserves a little; Adam keeps two float32 moments per float32 parameter.
"""

import json
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_PY = os.path.join(ROOT, ".venv-tpu", "bin", "python")
GiB = 1024**3


def run_aot(tmp_path, name: str, *args: str) -> tuple[int, dict, str]:
  if not os.path.exists(TPU_PY):
    pytest.fail(".venv-tpu is missing: run `make install-tpu` (make test does)")
  out = tmp_path / f"{name}.json"
  env = dict(os.environ, ALLOW_MULTIPLE_LIBTPU_LOAD="1", JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  env.pop("XLA_FLAGS", None)  # conftest's 8 host devices are not wanted here
  p = subprocess.run(
      [TPU_PY, os.path.join(ROOT, "experiments", "aot.py"), "--config", os.path.join(ROOT, "configs", "demo.py")]
      + ["--topology", "v5e:2x2", "--prompt_text_tokens", "32", "--json_out", str(out), *args],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=900,
  )
  log = p.stdout + p.stderr
  assert out.exists(), log[-4000:]
  return p.returncode, json.loads(out.read_text()), log


@pytest.mark.slow
def test_demo_rl_config_fits_v5e(tmp_path):
  rc, rep, log = run_aot(tmp_path, "rl", "--config.stage=rl", "--config.rl.beta=0.04")
  assert rc == 0, log[-4000:]
  assert rep["fits"] and rep["chips"] == 4 and rep["device_kind"] == "TPU v5 lite"
  assert "--xla_tpu_enable_windowed_einsum_for_all_gather=false" in log  # compiled with the trainer's libtpu flags
  assert 15 * GiB < rep["hbm_bytes"] <= 16 * GiB
  assert [r["name"] for r in rep["programs"]] == ["prefill", "decode", "ref_logprobs", "update_step"]
  sizes = rep["sizes"]
  # Adam: mu and nu like the float32 params, plus a few scalar counters.
  assert 3 * sizes["params"] <= sizes["state"] <= 3 * sizes["params"] + 4096
  for r in rep["programs"]:
    m = r["mem"]
    assert r["fits"] and 0 < r["total_bytes"] < 0.9 * rep["hbm_bytes"]
    assert m["argument"] > 0 and m["temp"] >= 0 and r["compile_s"] > 0
  # XLA's own argument bytes match the state and batch shards the tool computes from the trainer's shardings, up to
  # the TPU's tile padding (minor dims to 128 lanes; measured +3% on this tiny model); the state is donated (aliased
  # to the new state); beta 0.04: the reference params sit beside it, placed like the params.
  within = lambda xla, ours: ours <= xla <= 1.1 * ours
  update, ref = rep["programs"][-1], rep["programs"][2]
  assert within(update["mem"]["argument"], sizes["state"] + sizes["batch"])
  assert within(update["mem"]["alias"], sizes["state"])
  assert within(ref["mem"]["argument"], sizes["params"] + sizes["batch_inputs"])
  assert update["resident"] == {"ref_params": sizes["params"]}


@pytest.mark.slow
def test_oversized_config_does_not_fit(tmp_path):
  # 4M-wide MLPs: 6.4G float32 parameters, 77 GB with the Adam moments, over 4 chips of 16 GiB.
  rc, rep, log = run_aot(tmp_path, "big", "--config.stage=sft", "--config.model.arch.intermediate_size=4194304")
  assert rc == 1, log[-4000:]
  assert not rep["fits"]
  (r,) = rep["programs"]
  assert not r["fits"]
  assert ("oom" in r and r["oom"]["required"] > r["oom"]["available"]) or r["total_bytes"] > rep["hbm_bytes"]
  assert "DOES NOT FIT" in log


def test_plan_keeps_earlier_programs_and_marks_them():
  """make tpu-plan built up over runs: a program this run left out (--programs) keeps the earlier run's result, named
  with that run's revision, and the verdict covers it (here the earlier program did not fit, so the config does not)."""
  import sys

  sys.path.insert(0, os.path.join(ROOT, "experiments"))
  import aot_plan  # pylint: disable=g-import-not-at-top
  import aot_report  # pylint: disable=g-import-not-at-top

  mem = dict(argument=GiB, output=0, alias=0, temp=GiB, code=0)
  prog = lambda name, room: dict(name=name, mem=mem, resident={}, total_bytes=2 * GiB, headroom=room, fits=room >= 0.1)
  base = dict(config="c", topology="v5e:2x4", spec="s", chips=8, mesh={"data": 1, "fsdp": 8}, hbm_bytes=16 * GiB)
  old = dict(base, revision="abc1234", programs=[dict(prog("update_step", 0.05), compile_s=9.0, cached=False)])
  unselected = dict(name="update_step", skipped="not selected (--programs)", unselected=True, fits=True)
  new = dict(base, revision="def5678", programs=[unselected, dict(prog("prefill", 0.5), compile_s=3.0, cached=False)])
  merged = aot_plan.merge_earlier(new, old)
  assert [r["name"] for r in merged["programs"]] == ["update_step", "prefill"]
  assert merged["programs"][0]["earlier_revision"] == "abc1234" and not merged["fits"]
  text = aot_report.plan_markdown([merged], 1.0, 32, 0.1)
  assert (
      "| c | v5e:2x4 | 1x8 | update_step | 1.00 | 0.00 | 1.00 | 0.00 | 2.00 | 16.00 | 5% | 9 (earlier run, code at abc1234)"
      in text
  )
  assert "| c | v5e:2x4 | 8 | **no** | update_step | 2.00 / 16.00 | 5% |" in text


def test_update_step_signature_ignores_host_fields_and_optimizer_constants():
  """The paper's counting and structure GRPO / EKIPL configs share one update-step compile (they differ in host-side
  fields and in the length of an lr schedule); a field that changes the program's buffers (mu_dtype, micro_batches)
  keeps them apart."""
  import sys

  sys.path.insert(0, os.path.join(ROOT, "experiments"))
  import aot_compile  # pylint: disable=g-import-not-at-top
  import aot_plan  # pylint: disable=g-import-not-at-top

  rl = lambda arg, **kw: aot_plan.load_config(f"{ROOT}/configs/paper.py:{arg}", kw).rl.to_dict()
  views = [
      aot_compile.device_rl_fields(rl(f"qwen2_vl_7b,{t},{m}"))
      for t in ("counting", "structure")
      for m in ("grpo", "ekipl")
  ]
  assert (
      rl("qwen2_vl_7b,counting,grpo")["optimizer"]["total_steps"]
      != rl("qwen2_vl_7b,structure,grpo")["optimizer"]["total_steps"]
  )
  assert all(v == views[0] for v in views)
  assert (
      aot_compile.device_rl_fields(rl("qwen2_vl_7b,counting,grpo", **{"rl.optimizer.mu_dtype": "float32"})) != views[0]
  )
  assert aot_compile.device_rl_fields(rl("qwen2_vl_7b,counting,grpo", **{"rl.micro_batches": 16})) != views[0]


def test_a_report_with_nothing_compiled_gives_no_verdict(capsys):
  """Every program skipped (e.g. --programs sft_step on an RL config): no 'FITS' is printed and the report does not
  fit (the tool's exit code is 1), since nothing was measured."""
  import sys

  sys.path.insert(0, os.path.join(ROOT, "experiments"))
  import aot_report  # pylint: disable=g-import-not-at-top

  skipped = dict(name="update_step", skipped="not selected (--programs)", unselected=True, fits=True)
  geo = dict(images_per_prompt=1, grid=[1, 4, 4], image_tokens=4, prompt_tokens=10, P=16)
  rep = dict(
      config="c",
      stage="rl",
      topology="v5e:2x2",
      chips=4,
      device_kind="TPU v5 lite",
      mesh={"fsdp": 4},
      hbm_bytes=16 * GiB,
      hf_config="x",
      geometry=geo,
      sizes={},
      min_headroom=0.1,
      programs=[skipped],
      compiled=0,
      fits=False,
  )
  aot_report.print_report(rep)
  out = capsys.readouterr().out
  assert "NOTHING COMPILED" in out and "FITS" not in out.replace("NOTHING COMPILED", "")


def test_probe_cuts_the_depth_only():
  """--probe_depth L,Lv: the 7B config.json with L decoder layers and Lv vision blocks, every other field as it was
  (so per-layer buffers show as the difference of two probes); Qwen2.5-VL keeps a full-attention block below Lv."""
  import sys

  sys.path.insert(0, os.path.join(ROOT, "experiments"))
  import aot_programs  # pylint: disable=g-import-not-at-top
  from ekipl_jax.models import known_configs

  full = known_configs.lookup("qwen2_5_vl_7b")
  cut = aot_programs.shallow_copy(full, 2, 6)
  assert cut["num_hidden_layers"] == 2 and cut["vision_config"]["depth"] == 6
  assert cut["vision_config"]["fullatt_block_indexes"] == [5]  # 7, 15, 23, 31 are all >= 6
  assert full["num_hidden_layers"] == 28 and full["vision_config"]["depth"] == 32  # the original is untouched
  strip = lambda hf: {k: v for k, v in hf.items() if k not in ("num_hidden_layers", "vision_config")}
  assert strip(cut) == strip(full)
  assert aot_programs.shallow_copy(full, 28, 16)["vision_config"]["fullatt_block_indexes"] == [7, 15]
  with pytest.raises(ValueError, match="probe_depth"):
    aot_programs.shallow_copy(full, 29, 2)


def test_libtpu_flags_are_added_unless_the_user_named_them():
  from ekipl_jax import tpu_flags

  env = {}
  assert tpu_flags.apply(env) == " ".join(tpu_flags.FLAGS) == env["LIBTPU_INIT_ARGS"]
  assert tpu_flags.apply(env) == " ".join(tpu_flags.FLAGS)  # idempotent
  mine = "--xla_tpu_enable_windowed_einsum_for_all_gather=true --xla_foo=1"
  assert tpu_flags.libtpu_init_args(mine) == mine + " --xla_tpu_enable_windowed_einsum_for_reduce_scatter=false"
