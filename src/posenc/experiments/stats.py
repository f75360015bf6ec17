"""Bootstrap intervals for the scores of a record, recomputed from its counts.

* ``proportion_ci(hits, n)``: an exact-match or token-accuracy rate, bootstrapping the
  ``n`` Bernoulli outcomes (Efron & Tibshirani 1993, the percentile interval). Resampling
  ``n`` outcomes with replacement from ``hits`` ones and ``n - hits`` zeros gives a count
  distributed ``Binomial(n, hits / n)``, which is drawn directly.
* ``ppl_ci(nll_segments, segment_tokens)``: a perplexity, resampling whole segments
  (a block bootstrap: tokens inside a segment are not independent, segments spread over
  the corpus are treated as independent blocks; Kunsch 1989).
* ``pooled_ci(runs)`` / ``pooled_ppl_ci(runs)``: a cell pooled over runs (seeds), by a
  two-stage bootstrap: runs with replacement, then each drawn run's outcomes or segments.
  The estimate is the mean rate over runs / the perplexity of all tokens of all runs.
  With 3 seeds the first stage has only 10 distinct draws, so the interval is coarse.
* ``paired_ppl_draws(runs)`` / ``paired_rate_draws(runs)``: the bootstrap draws of several
  cells at once, paired (the same runs, and for perplexities the same test segments, on
  every cell), so a ratio or difference of two cells gets the interval of a paired
  comparison (``extend_claims``).
* ``wilson_ci(hits, n)``: the Wilson score interval (Wilson 1927), the closed form the
  bootstrap is tested against. At ``hits = 0`` or ``n`` every bootstrap resample equals
  the data, so ``proportion_ci`` is the point itself; Wilson's interval is not
  (its upper end at 0/n is about ``z**2 / n``), so use it there.

Every function is deterministic for a ``seed`` (NumPy's ``default_rng``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist

import numpy as np

#: Bootstrap resamples by default.
RESAMPLES = 10_000


def _check_level(level: float) -> None:
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), e.g. 0.95, got {level!r}")


def _check_resamples(resamples: int) -> None:
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 100:
        raise ValueError(f"resamples must be an int >= 100, got {resamples!r}")


def _check_count(hits: int, n: int, where: str = "") -> None:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"{where}n must be an int >= 1 (the number of outcomes), got {n!r}")
    if isinstance(hits, bool) or not isinstance(hits, (int, np.integer)) or not 0 <= hits <= n:
        raise ValueError(f"{where}hits must be an int in [0, n={n}], got {hits!r}")


def _percentile(samples: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(samples, [tail, 1.0 - tail])
    return float(lo), float(hi)


def wilson_ci(hits: int, n: int, *, level: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of the proportion ``hits / n`` (Wilson 1927):
    ``(p + z²/2n ± z sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)``."""
    _check_count(hits, n)
    _check_level(level)
    z = NormalDist().inv_cdf(0.5 + level / 2.0)
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def proportion_ci(
    hits: int, n: int, *, level: float = 0.95, resamples: int = RESAMPLES, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval ``(lo, hi)`` of the rate ``hits / n`` (``n`` Bernoulli
    outcomes, e.g. a metrics entry's ``exact_hits`` and ``samples``)."""
    _check_count(hits, n)
    _check_level(level)
    _check_resamples(resamples)
    draws = np.random.default_rng(seed).binomial(n, hits / n, size=resamples) / n  # [resamples]
    return _percentile(draws, level)


def _check_segments(nll_segments: Sequence[float], segment_tokens: int, where: str = "") -> np.ndarray:
    nll = np.asarray(nll_segments, dtype=np.float64)
    if nll.ndim != 1 or len(nll) < 1 or not np.isfinite(nll).all() or (nll < 0).any():
        raise ValueError(f"{where}nll_segments must be a non-empty list of finite numbers >= 0, got {nll_segments!r}")
    if isinstance(segment_tokens, bool) or not isinstance(segment_tokens, (int, np.integer)) or segment_tokens < 1:
        raise ValueError(
            f"{where}segment_tokens must be an int >= 1 (scored tokens per segment), got {segment_tokens!r}"
        )
    return nll


def ppl_ci(
    nll_segments: Sequence[float],
    segment_tokens: int,
    *,
    level: float = 0.95,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> tuple[float, float]:
    """Block-bootstrap interval ``(lo, hi)`` of ``exp(sum(nll) / (k * segment_tokens))``:
    the ``k`` segments (a metrics entry's ``nll_segments`` or ``nll_sliding_segments``,
    each the summed NLL of ``segment_tokens`` tokens) resampled with replacement."""
    nll = _check_segments(nll_segments, segment_tokens)
    _check_level(level)
    _check_resamples(resamples)
    k = len(nll)
    idx = np.random.default_rng(seed).integers(0, k, size=(resamples, k))  # [resamples, k]
    return _percentile(np.exp(nll[idx].mean(axis=1) / segment_tokens), level)


def pooled_ci(
    runs: Sequence[tuple[int, int]], *, level: float = 0.95, resamples: int = RESAMPLES, seed: int = 0
) -> tuple[float, float]:
    """Two-stage bootstrap interval ``(lo, hi)`` of the mean rate over runs: ``runs`` is
    one ``(hits, n)`` per run (seed); each resample draws runs with replacement, then
    each drawn run's count from ``Binomial(n, hits / n)``."""
    if not runs:
        raise ValueError("runs must hold at least one (hits, n) pair")
    for i, run in enumerate(runs):
        if not isinstance(run, (tuple, list)) or len(run) != 2:
            raise ValueError(f"runs[{i}] must be a (hits, n) pair, got {run!r}")
        _check_count(run[0], run[1], f"runs[{i}]: ")
    _check_level(level)
    _check_resamples(resamples)
    hits = np.array([r[0] for r in runs], dtype=np.int64)  # [r]
    n = np.array([r[1] for r in runs], dtype=np.int64)  # [r]
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(runs), size=(resamples, len(runs)))  # [resamples, r]
    rates = rng.binomial(n[pick], hits[pick] / n[pick]) / n[pick]  # [resamples, r]
    return _percentile(rates.mean(axis=1), level)


def pooled_ppl_ci(
    runs: Sequence[tuple[Sequence[float], int]],
    *,
    level: float = 0.95,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> tuple[float, float]:
    """Two-stage bootstrap interval ``(lo, hi)`` of the perplexity of a cell pooled over
    runs: ``runs`` is one ``(nll_segments, segment_tokens)`` per run; each resample draws
    runs with replacement, then each drawn run's segments with replacement, and takes
    ``exp(total NLL / total tokens)``."""
    if not runs:
        raise ValueError("runs must hold at least one (nll_segments, segment_tokens) pair")
    checked = []
    for i, run in enumerate(runs):
        if not isinstance(run, (tuple, list)) or len(run) != 2:
            raise ValueError(f"runs[{i}] must be a (nll_segments, segment_tokens) pair, got {run!r}")
        checked.append((_check_segments(run[0], run[1], f"runs[{i}]: "), int(run[1])))
    _check_level(level)
    _check_resamples(resamples)
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(checked), size=(resamples, len(checked)))  # [resamples, r]
    nll_sum = np.zeros(resamples)
    tokens = np.zeros(resamples)
    for j in range(len(checked)):  # slot j of every resample
        for i, (nll, seg_tokens) in enumerate(checked):
            rows = np.nonzero(pick[:, j] == i)[0]  # resamples whose slot j drew run i
            idx = rng.integers(0, len(nll), size=(len(rows), len(nll)))  # [rows, k_i]
            nll_sum[rows] += nll[idx].sum(axis=1)
            tokens[rows] += len(nll) * seg_tokens
    return _percentile(np.exp(nll_sum / tokens), level)


def paired_ppl_draws(
    runs: Sequence[Sequence[tuple[Sequence[float], int]]], *, resamples: int = RESAMPLES, seed: int = 0
) -> np.ndarray:
    """Bootstrap draws ``[resamples, terms]`` of the pooled perplexity of several terms
    scored on the same test segments: ``runs`` is one list per run (seed) of one
    ``(nll_segments, segment_tokens)`` per term, every term of a run with the same number
    of segments (the same text scored by two models, or at two lengths). Each resample
    draws runs with replacement, then segment indices with replacement, the same indices
    for every term of the run (a paired two-stage block bootstrap), and takes each
    term's ``exp(total NLL / total tokens)``: a ratio of two columns is then paired."""
    if not runs or any(not r for r in runs) or len({len(r) for r in runs}) != 1:
        raise ValueError("runs must be a non-empty list of runs, each with the same number (>= 1) of terms")
    _check_resamples(resamples)
    checked = []
    for i, terms in enumerate(runs):
        arrays = [_check_segments(nll, tokens, f"runs[{i}]: ") for nll, tokens in terms]
        if len({len(a) for a in arrays}) != 1:
            raise ValueError(f"runs[{i}]: every term must have the same number of segments (they are paired)")
        checked.append((np.stack(arrays), np.array([tokens for _, tokens in terms], dtype=np.float64)))
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(checked), size=(resamples, len(checked)))  # [resamples, r]
    terms = len(runs[0])
    nll_sum = np.zeros((resamples, terms))
    tokens = np.zeros((resamples, terms))
    for j in range(len(checked)):  # slot j of every resample
        for i, (nll, seg_tokens) in enumerate(checked):  # nll: [terms, k_i]
            rows = np.nonzero(pick[:, j] == i)[0]  # resamples whose slot j drew run i
            idx = rng.integers(0, nll.shape[1], size=(len(rows), nll.shape[1]))  # [rows, k_i]
            nll_sum[rows] += nll[:, idx].sum(axis=2).T  # [terms, rows, k_i] -> [rows, terms]
            tokens[rows] += nll.shape[1] * seg_tokens
    return np.exp(nll_sum / tokens)


def paired_rate_draws(
    runs: Sequence[Sequence[tuple[int, int]]], *, resamples: int = RESAMPLES, seed: int = 0
) -> np.ndarray:
    """Bootstrap draws ``[resamples, terms]`` of the mean rate over runs of several terms:
    ``runs`` is one list per run (seed) of one ``(hits, n)`` per term. Each resample draws
    runs with replacement (the same runs for every term: paired by seed), then each term's
    count from ``Binomial(n, hits / n)`` independently (the counts carry no pairing of
    test examples)."""
    if not runs or any(not r for r in runs) or len({len(r) for r in runs}) != 1:
        raise ValueError("runs must be a non-empty list of runs, each with the same number (>= 1) of terms")
    _check_resamples(resamples)
    for i, terms in enumerate(runs):
        for j, (hits, n) in enumerate(terms):
            _check_count(hits, n, f"runs[{i}][{j}]: ")
    hits = np.array([[h for h, _ in terms] for terms in runs], dtype=np.int64)  # [r, terms]
    n = np.array([[k for _, k in terms] for terms in runs], dtype=np.int64)  # [r, terms]
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(runs), size=(resamples, len(runs)))  # [resamples, r]
    rates = rng.binomial(n[pick], hits[pick] / n[pick]) / n[pick]  # [resamples, r, terms]
    return rates.mean(axis=1)
