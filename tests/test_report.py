"""Report helpers against hand-computed values and the combinatorial definition of Pass@k."""

import itertools
import math

import numpy as np
import pytest

from ekipl_jax.train import report


@pytest.mark.parametrize("n,c,k", [(5, 0, 1), (5, 2, 1), (5, 2, 3), (8, 7, 2), (4, 4, 4), (6, 1, 6)])
def test_pass_at_k_matches_enumeration(n, c, k):
  # Enumerate every k-subset of n samples of which the first c are correct.
  subsets = list(itertools.combinations(range(n), k))
  expected = sum(any(i < c for i in s) for s in subsets) / math.comb(n, k)
  assert report.pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_curves_mean_and_std_over_seeds():
  runs = {
      "grpo": [
          [{"step": 0, "acc": 10.0}, {"step": 5, "acc": 20.0}],
          [{"step": 0, "acc": 30.0}, {"step": 5, "acc": 40.0}, {"step": 9, "acc": 1.0}],
      ]
  }
  steps, mean, std = report.curves(runs, "acc")["grpo"]
  np.testing.assert_array_equal(steps, [0, 5])  # step 9 is not in every seed
  np.testing.assert_allclose(mean, [20.0, 30.0])
  np.testing.assert_allclose(std, [10.0, 10.0])


def test_first_step_reaching():
  assert report.first_step_reaching(np.array([0, 10, 20]), np.array([1.0, 5.0, 7.0]), 5.0) == 10
  assert report.first_step_reaching(np.array([0, 10]), np.array([1.0, 2.0]), 5.0) is None


def test_table_orders_reason_rft_columns_first():
  md = report.results_table({"ekipl": {"test_id": [50.0, 60.0], "clevr-math": [90.0]}})
  header, _, row = md.strip().splitlines()
  assert header == "| method | clevr-math | test_id |"
  assert row == "| ekipl | 90.00 | 55.00 ± 5.00 |"
