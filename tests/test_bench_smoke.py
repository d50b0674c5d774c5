"""The bench functions run on a toy config and their counts agree with XLA's (no timing is asserted)."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))

import bench  # noqa: E402
import bench_update  # noqa: E402


def test_update_bench_on_toy_config():
  u = bench_update.run(text=bench_update.TOY, B=2, P=8, C=8, chunk=4, repeats=1, matmul_n=128, memory_variants=False)
  assert u["compilations_after_warmup"] == 0
  assert 0.8 < u["flops_xla"] / u["flops_analytic"] < 1.5  # XLA also counts elementwise work
  assert u["mem_xla_bytes"] > u["mem_state_bytes"] * 3 / 4  # params, mu, nu at least (grads may be temporaries)
  assert u["step_s"] > 0 and u["matmul_peak_flops"] > 0


def test_analytic_flops_remat_adds_one_decoder_forward():
  t = bench_update.TOY
  plain = bench_update.analytic_flops(t, 1000, 2, 8, 8, remat=False)
  remat = bench_update.analytic_flops(t, 1000, 2, 8, 8, remat=True)
  assert remat["flops_analytic"] - plain["flops_analytic"] == plain["flops_dense_fwd"] + plain["flops_attention_fwd"]


@pytest.mark.parametrize("ratio", [0.5, 5.0])
def test_report_names_every_missed_goal(ratio):
  per_dtype = dict(
      speedup=ratio,
      ours_decode_step_s=0.01,
      ours_matmul_chain_s=0.005,
      speedup_bound=2 * ratio,
      hf_step_s=0.02,
      hf_matmul_chain_s=0.01,
      hf_s_per_call=2.0,
      ours_prefill_s=0.1,
      ours_attention_s=0.001,
      speedup_bound_with_attention=1.5 * ratio,
  )
  s = dict(float32=per_dtype, bfloat16=per_dtype, new_tokens=128, speedup=ratio, ours_compilations_after_warmup=0)
  t = dict(ours_over_tunix=ratio)
  u = dict(mfu_vs_matmul_peak=ratio / 10, compilations_after_warmup=0)
  lines = [line for line in bench.missed(s, t, u) if line.startswith("- ")]  # one per goal, details indented
  assert (len(lines) == 3) if ratio < 1 else (lines == ["- none."])
