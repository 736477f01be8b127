"""Paired statistics for comparing evaluation runs on the same items.

Two runs answer the same items, so their accuracies are compared per item (paired), not as two
independent samples: the confidence interval is that of the mean per-item difference and the
test is McNemar's on the items where exactly one run is right.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

Z95 = statistics.NormalDist().inv_cdf(0.975)   # 1.95996...


def mean_ci(values: Sequence[float], z: float = Z95) -> tuple[float, float, float]:
  """(mean, low, high): the mean of `values` and its normal-approximation (Wald) 95 % interval,
  mean ± z·s/√n with s the population standard deviation (divisor n).

  For one run's 0/1 scores this is the Wald interval of a proportion; for per-item differences
  of two runs' 0/1 scores (each −1, 0 or +1) it is the Wald interval of the difference of
  paired proportions, (c − b)/n ± z·√((b + c) − (c − b)²/n)/n, with b and c the discordant
  counts. With the divisor n it also serves fractional scores (XSum's ROUGE-L). The interval is
  degenerate (zero width) when all values are equal; n = 0 gives NaNs.
  """
  n = len(values)
  if n == 0:
    return math.nan, math.nan, math.nan
  m = math.fsum(values) / n
  half = z * math.sqrt(math.fsum((v - m) ** 2 for v in values) / n / n)
  return m, m - half, m + half


def mcnemar_exact(b: int, c: int) -> float:
  """Exact two-sided McNemar p-value for discordant counts b (first run right, second wrong)
  and c (first wrong, second right): under no difference each discordant item goes either way
  with probability 1/2, so p = min(1, 2·P(X ≤ min(b, c))) for X ~ Binomial(b + c, 1/2).
  1.0 when there are no discordant items. Integer arithmetic (`math.comb`), no scipy needed.
  """
  if b < 0 or c < 0:
    raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
  n = b + c
  if n == 0:
    return 1.0
  tail = sum(math.comb(n, k) for k in range(min(b, c) + 1))
  return min(1.0, 2 * tail / 2 ** n)
