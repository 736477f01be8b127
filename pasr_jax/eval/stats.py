"""Paired statistics for comparing evaluation runs on the same items.

Two runs answer the same items, so their accuracies are compared per item (paired), not as two
independent samples: the confidence interval is that of the mean per-item difference and the
test is McNemar's on the items where exactly one run is right; over several training seeds,
the Cochran–Mantel–Haenszel test with the seed as stratum (`cmh_paired`).
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


def cmh_paired(strata: Sequence[tuple[int, int]], correction: bool = False) -> dict[str, float]:
  """Cochran–Mantel–Haenszel test for paired binary outcomes pooled over strata (e.g. training
  seeds): `strata` holds each stratum's discordant counts (b, c) as in `mcnemar_exact` (b:
  first arm right, second wrong; c: the other way round).

  Why this form: with paired data every item is its own 2×2 stratum (arm × right), and the CMH
  statistic over those per-item tables is (Σ(c − b))² / Σ(b + c) — McNemar's on the pooled
  discordant counts (concordant items add neither to the numerator nor to the variance).
  Seeds group the items into larger strata without changing that sum, so the seed-stratified
  paired test is this statistic; an unpaired CMH with one arm × right table per seed would
  throw the pairing away. Under no difference each discordant item, in any stratum, goes
  either way with probability 1/2, so the exact p is `mcnemar_exact` on the pooled counts.

  Returns b, c (pooled), chi2 (with CMH's 0.5 continuity correction when `correction`, i.e.
  (|c − b| − 1)² / (b + c)), p (χ²
  with one degree of freedom), p_exact, and the Mantel–Haenszel common odds ratio for matched
  pairs c/b (inf when b = 0 < c; NaN without discordant items).
  """
  if not strata:
    raise ValueError("cmh_paired: no strata")
  for b, c in strata:
    if b < 0 or c < 0:
      raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
  b = sum(s[0] for s in strata)
  c = sum(s[1] for s in strata)
  n = b + c
  if n == 0:
    return dict(b=0.0, c=0.0, chi2=0.0, p=1.0, p_exact=1.0, odds_ratio=math.nan)
  # Per item, Σ(a − E a) = (c − b)/2 and Σ Var a = (b + c)/4: CMH's 0.5 correction on the
  # former is 1 on |c − b|.
  num = max(abs(c - b) - 1.0, 0.0) if correction else float(c - b)
  chi2 = num * num / n
  return dict(b=float(b), c=float(c), chi2=chi2, p=math.erfc(math.sqrt(chi2 / 2)),
              p_exact=mcnemar_exact(b, c), odds_ratio=c / b if b else math.inf)
