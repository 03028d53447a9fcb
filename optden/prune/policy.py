"""prune="auto": pruned or dense, per evaluation and query group, from what is known before
spending (docs/design.md, "Pruning"; issue 22).

A pruned evaluation of n queries costs a search for each (``t_search`` per query) and
then a dense pass for the ones it could not certify; a dense evaluation costs one pass.
A pass over all rows costs ``a + b n`` (``a``: reading the rows, the part a pass pays
whatever n is; ``b``: the arithmetic per query), so with p the expected certified share:

    pruned ~ n t_search + [p < 1] (a + b n (1 - p))        dense ~ a + b n

(the bracket: some query of the group falls back to a pass). The policy prunes a group
when that estimate beats dense by ``MARGIN``. What it knows before spending:

* p at a sigma: the certified share it measured at that sigma or a nearby one (bins of
  0.1 in log10 sigma, nearest within ``NEARBY`` bins) on this index; before any, a prior
  from sigma against the data's neighbour scale: a query drawn near row i is certifiable
  when the rows beyond its ``NN_RANK`` nearest ones (the candidates re-scored exactly) sit
  far enough: with r the distance to the NN_RANK-th nearest other row, ``r^2 / 2 sigma^2
  - 2 r / sigma >= log(1 / tol_mass) + 2`` (the noise's projection at two standard
  deviations), on a sample of rows whose exact neighbours the index finds once
  (``nn_sample``). Not the nearest other row: a posterior shared by a few near-duplicate
  rows certifies all the same. The prior is still pessimistic (1.2M textured patches at
  sigma 0.05: 0.35 from the nearest row, 0.38 from the 16th, 0.69 certified), and a
  pessimistic guess is never corrected, since only a pruned attempt measures the share:
  so where nothing was measured nearby and the prior is at least ``EXPLORE_SHARE``, the
  group is tried pruned once (at worst a search on top of the dense pass), and the
  measured outcome decides from then on;
* t_search, a, b: measured by the evaluations it ran (running means of time per searched
  query at each sigma bin; a least-squares fit of a + b n over the recent dense passes),
  with priors from the rows' bytes and the dimension until measured.

What an evaluation cost decides over any estimate. The model above is only a guess: the
dense pass's time per query grows with sigma (1.2M rows, 64 queries: 273 ms at sigma 0.02,
780 ms at 0.5), and the queries a pruned evaluation leaves to the pass are its hardest (a
pass over them costs ~1.5x a pass over as many typical ones), so a model fitted to those
passes overrated dense and kept pruning where it lost 4-8%. So the denoiser also records
each whole evaluation (search and fallback pass together; ``record_evaluation``) as seconds
per query-equivalent, ``seconds / (n + N0)`` (N0: the queries whose arithmetic equals the
pass's reading of the rows, from the priors). Near a sigma:

* both ways measured: prune when the pruned cost is below ``(1 - MARGIN)`` of dense's;
* only pruned measured: keep pruning when it is below ``CONFIDENT`` of the cheapest dense
  evaluation seen at any sigma (or, none seen, when it certified at least
  ``CONFIDENT_SHARE`` of its queries); otherwise run dense once, which measures dense here;
* otherwise the model, and the exploration above.

So a losing pruned way is paid at most once near a sigma before dense is measured there,
and afterwards only where its measured cost beat dense's by MARGIN.

Cost only, never correctness: every pruned evaluation is certified or runs dense.
"""
from __future__ import annotations

import math
from collections import deque

import numpy as np
import torch

__all__ = ["PrunePolicy", "MARGIN", "NEARBY", "NN_RANK", "EXPLORE_SHARE", "CONFIDENT", "CONFIDENT_SHARE"]

#: Prune only when the estimate is below (1 - MARGIN) of the dense pass's.
MARGIN = 0.1
#: The prior's neighbour rank: rows nearer than the NN_RANK-th are taken to be re-scored.
NN_RANK = 16
#: With nothing measured nearby, a prior share at least this sends the group pruned once.
EXPLORE_SHARE = 0.25
#: Only pruned measured near a sigma: keep pruning when its cost is below CONFIDENT of the
#: cheapest dense evaluation seen at any sigma (dense costs grow with sigma: ~1.25x from
#: sigma 0.02 to 0.05 on 1.2M patches, so 0.7 x the cheapest seen stays below 0.9 x the
#: dense cost where it was not measured).
CONFIDENT = 0.7
#: ... or, no dense evaluation seen anywhere, when it certified at least this share.
CONFIDENT_SHARE = 0.95
#: Bins of 0.1 in log10 sigma; outcomes up to NEARBY bins away count as "nearby sigma".
BIN = 0.1
NEARBY = 2
#: Priors until measured: a dense pass reads the rows at PRIOR_BYTES_PER_S and does
#: PRIOR_MACS_PER_S multiply-adds; a search costs PRIOR_SEARCH_SHARE of a query's pass.
PRIOR_BYTES_PER_S = 4e9
PRIOR_MACS_PER_S = 2e10
PRIOR_SEARCH_SHARE = 0.25


class PrunePolicy:
    """The cost model of prune="auto" for one index (see the module docstring).

    index: the ``EmbeddingIndex`` (or ``PruneIndex``) the pruner searches; tol_mass: the
    certificate's left-out mass; nn_rows: rows sampled for the nearest-neighbour scale.
    """

    def __init__(self, index, tol_mass: float, itemsize: int = 1, nn_rows: int = 256, seed: int = 0):
        self.index = index
        self.tol_mass = float(tol_mass)
        self.M, self.d = index.M, index.d
        self.itemsize = int(itemsize)
        self.nn_rows = int(nn_rows)
        self.seed = int(seed)
        self._nn = None  # nearest-other-row distances of sample rows (raw units), lazily
        self.outcomes: dict[int, list] = {}  # sigma bin -> [tried, certified, seconds searching]
        self.passes = deque(maxlen=16)  # (n, seconds) of recent dense passes
        # sigma bin -> {True: [evaluations, summed cost], False: [...]}: whole evaluations,
        # pruned (True) or dense (False), cost = seconds / (n + N0)
        self.evaluations: dict[int, dict[bool, list]] = {}
        self.decisions = {"pruned": 0, "dense": 0}

    # ---------------------------------------------------------------- what is known
    def nn_sample(self, nearest=None) -> np.ndarray:
        """Exact distances (raw units) from sampled rows to their NN_RANK-th nearest other
        row (the last other row when there are fewer).

        nearest(v (n, d), k) -> (d2 (n, k), idx (n, k), ok (n,)): the index's certified
        nearest search (rows whose search hit its limits are left out of the sample)."""
        if self._nn is None and nearest is not None:
            ds = self.index.dataset
            rows = np.sort(np.random.default_rng(self.seed).choice(self.M, min(self.M, self.nn_rows), replace=False))
            v = ds.raw_rows(rows).to(torch.float64) - torch.from_numpy(np.array(ds.center, dtype=np.float64))
            if self.M < 2:
                self._nn = np.full(1, np.inf)
            else:
                # the row itself is among the k nearest (distance 0; a duplicate of it may
                # take its place, the same distance), so the last of them is the (k - 1)-th other
                d2, _, ok = nearest(v, min(NN_RANK + 1, self.M))
                self._nn = np.sqrt(np.maximum(d2.numpy()[:, -1][ok.numpy()], 0.0))
        return self._nn if self._nn is not None else np.zeros(0)

    def prior_share(self, sigma_raw: float) -> float:
        """Certifiable share of queries near the rows at sigma (raw units), from the
        neighbour scale of ``nn_sample`` (0 when unknown)."""
        nn = self.nn_sample()
        if nn.size == 0:
            return 0.0
        s = float(sigma_raw)
        score = nn**2 / (2 * s * s) - 2 * nn / s
        return float((score >= math.log(1.0 / self.tol_mass) + 2.0).mean())

    def _bin(self, sigma_raw: float) -> int:
        return int(math.floor(math.log10(max(float(sigma_raw), 1e-300)) / BIN))

    def _nearby(self, sigma_raw: float):
        """The outcomes [tried, certified, seconds] measured at the bin of sigma or the nearest
        one within NEARBY bins (None if there are none)."""
        b = self._bin(sigma_raw)
        for off in sorted(range(-NEARBY, NEARBY + 1), key=abs):
            o = self.outcomes.get(b + off)
            if o is not None and o[0] > 0:
                return o
        return None

    def share(self, sigma_raw: float) -> float:
        """Expected certified share at sigma: measured at the nearest bin within NEARBY, else the prior."""
        o = self._nearby(sigma_raw)
        return o[1] / o[0] if o is not None else self.prior_share(sigma_raw)

    def search_seconds(self, sigma_raw: float) -> float:
        """Expected seconds of a search per query at sigma (measured nearby, else the prior)."""
        o = self._nearby(sigma_raw)
        return o[2] / o[0] if o is not None else PRIOR_SEARCH_SHARE * self.dense_model()[1]

    def dense_model(self) -> tuple[float, float]:
        """(a, b) of a dense pass's seconds a + b n: least squares over the recent passes
        (b from their spread in n when there is one), else the priors."""
        a0 = self.M * self.d * self.itemsize / PRIOR_BYTES_PER_S
        b0 = self.M * self.d / PRIOR_MACS_PER_S
        if not self.passes:
            return a0, b0
        n = np.array([p[0] for p in self.passes], dtype=np.float64)
        t = np.array([p[1] for p in self.passes], dtype=np.float64)
        if np.ptp(n) > 0:
            b, a = np.polyfit(n, t, 1)
            if a >= 0 and b > 0:
                return float(a), float(b)
        # one n seen: split the measured time in the priors' proportion
        scale = float(np.median(t / (a0 + b0 * n)))
        return a0 * scale, b0 * scale

    # ---------------------------------------------------------------- the decision
    def estimate(self, sigma_raw: float, n: int) -> tuple[float, float]:
        """(pruned seconds, dense seconds) expected for n queries at sigma (raw units)."""
        a, b = self.dense_model()
        p = self.share(sigma_raw)
        pruned = n * self.search_seconds(sigma_raw) + (0.0 if p >= 1.0 else a + b * n * (1.0 - p))
        return pruned, a + b * n

    def choose(self, sigma_raw: float, n: int) -> bool:
        """True: run the group of n queries at sigma (raw units) pruned; False: dense."""
        P, D = self.measured_cost(sigma_raw, True), self.measured_cost(sigma_raw, False)
        if P is not None and D is not None:
            go = P < (1.0 - MARGIN) * D
        elif P is not None:
            dmin = self.cheapest_dense()
            go = P < CONFIDENT * dmin if dmin is not None else self.share(sigma_raw) >= CONFIDENT_SHARE
        else:
            pruned, dense = self.estimate(sigma_raw, n)
            go = pruned < (1.0 - MARGIN) * dense
            if not go and self._nearby(sigma_raw) is None and self.prior_share(sigma_raw) >= EXPLORE_SHARE:
                go = True  # explore: measure the share the prior underestimates (module docstring)
        self.decisions["pruned" if go else "dense"] += 1
        return go

    def _n0(self) -> float:
        """Queries whose arithmetic costs what the pass's reading of the rows does (the priors' a / b)."""
        return self.itemsize * PRIOR_MACS_PER_S / PRIOR_BYTES_PER_S

    def measured_cost(self, sigma_raw: float, pruned: bool):
        """Mean cost (seconds per query-equivalent) of whole evaluations run pruned (True) or
        dense (False) at the bin of sigma or the nearest one within NEARBY bins; None if none."""
        b = self._bin(sigma_raw)
        for off in sorted(range(-NEARBY, NEARBY + 1), key=abs):
            e = self.evaluations.get(b + off, {}).get(bool(pruned))
            if e is not None and e[0] > 0:
                return e[1] / e[0]
        return None

    def cheapest_dense(self):
        """The smallest mean cost of dense evaluations at any sigma bin (None if none)."""
        costs = [e[False][1] / e[False][0] for e in self.evaluations.values() if e.get(False, [0])[0] > 0]
        return min(costs) if costs else None

    # ---------------------------------------------------------------- what was measured
    def record_pruned(self, sigma_raw: float, tried: int, certified: int, seconds: float) -> None:
        """A pruned attempt: queries searched (cache hits excluded), certified, seconds spent."""
        o = self.outcomes.setdefault(self._bin(sigma_raw), [0, 0, 0.0])
        o[0] += int(tried)
        o[1] += int(certified)
        o[2] += float(seconds)

    def record_evaluation(self, sigma_raw: float, n: float, seconds: float, pruned: bool) -> None:
        """A whole evaluation of n queries at sigma that ``choose`` sent pruned (True: its search
        and the dense pass of what it left, together) or dense (False) took seconds."""
        if n > 0 and seconds > 0:
            e = self.evaluations.setdefault(self._bin(sigma_raw), {}).setdefault(bool(pruned), [0, 0.0])
            e[0] += 1
            e[1] += float(seconds) / (float(n) + self._n0())

    def record_dense(self, n: int, seconds: float) -> None:
        """A dense pass over all rows for n queries took seconds."""
        if n > 0 and seconds > 0:
            self.passes.append((int(n), float(seconds)))
