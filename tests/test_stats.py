"""pasr_jax.eval.stats against cases computed by hand (no engine)."""

import math

import pytest

from pasr_jax.eval.stats import Z95, mcnemar_exact, mean_ci


def test_mcnemar_exact_by_hand():
  # p = 2 * P(X <= min(b, c)), X ~ Binomial(b + c, 1/2), capped at 1.
  assert mcnemar_exact(0, 5) == 0.0625                   # 2 * 1/32
  assert mcnemar_exact(5, 0) == 0.0625                   # two-sided: symmetric
  assert mcnemar_exact(1, 9) == pytest.approx(0.021484375, abs=1e-15)   # 2 * (1 + 10)/1024
  assert mcnemar_exact(2, 8) == pytest.approx(0.109375, abs=1e-15)      # 2 * (1 + 10 + 45)/1024
  assert mcnemar_exact(1, 4) == 0.375                    # 2 * (1 + 5)/32
  assert mcnemar_exact(3, 3) == 1.0                      # 2 * 42/64 > 1 -> 1
  assert mcnemar_exact(0, 0) == 1.0                      # no discordant items: no evidence
  with pytest.raises(ValueError, match="b=-1"):
    mcnemar_exact(-1, 2)


def test_mcnemar_exact_matches_scipy_on_large_counts():
  stats = pytest.importorskip("scipy.stats")
  for b, c in ((40, 60), (200, 260), (700, 650), (0, 30)):
    assert mcnemar_exact(b, c) == pytest.approx(
        stats.binomtest(b, b + c, 0.5).pvalue, rel=1e-9), (b, c)


def test_paired_ci_by_hand():
  # 10 items: 4 only the second run gets right (+1), 1 only the first (-1), 5 agree (0).
  # Paired proportions: (c - b)/n = 0.3, half width z * sqrt((b + c) - (c - b)^2/n)/n
  # = 1.95996 * sqrt(5 - 0.9)/10 = 0.396862.
  m, lo, hi = mean_ci([1.0] * 4 + [-1.0] + [0.0] * 5)
  assert Z95 == pytest.approx(1.959964, abs=1e-6)
  assert m == pytest.approx(0.3)
  assert (lo, hi) == pytest.approx((0.3 - 0.396862, 0.3 + 0.396862), abs=1e-6)


def test_proportion_ci_by_hand_and_edges():
  # 3 of 4 right: 0.75 +- 1.95996 * sqrt(0.75 * 0.25 / 4) = 0.75 +- 0.424344.
  m, lo, hi = mean_ci([1.0, 1.0, 1.0, 0.0])
  assert (m, lo, hi) == pytest.approx((0.75, 0.325656, 1.174344), abs=1e-6)
  assert mean_ci([1.0, 1.0]) == (1.0, 1.0, 1.0)          # no spread: zero width
  assert all(math.isnan(v) for v in mean_ci([]))
