"""OptimalDenoiser: the exact, certified empirical optimal denoiser of a Dataset.

``D*(u; sigma) = sum_i softmax_i(-||u - y_i||^2 / 2 sigma^2) y_i`` with ``u = x / s``
(EDM's scaling: VE has s = 1; VP and flow matching pass their s). Computed by a
backend's coarse pass (``optden.engine.dispatch``) and certified by
``optden.engine.precision``.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from . import autograd
from .engine import backends as _backends  # noqa: F401  (registers the built-in backends)
from .calling import one_hot_to_index
from .data.storage import STORAGE_DTYPES
from .engine import dispatch
from .errors import DatasetError, DtypeError, InputError, PrecisionError
from .prune import EmbeddingIndex, Pruner, PruneIndex, PrunePolicy, exact_sq_distances
from .engine.bounds import dense_threshold, query_delta, query_shift
from .engine.gaps import centered_query, divide
from .engine.precision import (DEFAULT_TOL, EXACT, MODE_NAMES, Certified, absolute, candidate_sqdist, certify,
                               exact_pass, rows_of as _rows_of)
from .engine.partial import Partial
from .engine.rows import RowSource
from .engine.stats import from_exact
from .posterior import Diagnostics, PosteriorCov, diagnostics_from, uniform_diagnostics
from .validate import _all_finite  # private: validate's one-pass finiteness test (numpy for small CPU tensors)
from .validate import as_tensor, check_device, check_positive_int, check_queries, check_sigma


def _is_index(prune) -> bool:
    """Whether ``prune`` is an index object (``EmbeddingIndex`` or ``PruneIndex``)."""
    return hasattr(prune, "kind") and hasattr(prune, "fingerprint") and hasattr(prune, "M")


@dataclass
class Evaluation:
    """Everything one evaluation produced, per query (float64 unless noted).

    denoised: (N, d) D* in model space.   lse: (N,) logsumexp_i of -||u - y_i||^2 / 2 sigma^2.
    top_w: (N, K) largest weights;        top_idx: (N, K) their dataset row indices (int64;
        a pruned evaluation with fewer candidates than K pads with weight 0 and index -1).
    bound: (N,) certified bound on the relative weight left out or misweighted.
    mode: list of str per query: "dense", "rescored", "exact", or (pruned path,
        ``optden.prune``) "pruned" (FAISS candidates) / "cached" (neighbour cache).
    """

    denoised: torch.Tensor
    lse: torch.Tensor
    top_w: torch.Tensor
    top_idx: torch.Tensor
    bound: torch.Tensor
    mode: list


class OptimalDenoiser:
    """The empirical optimal denoiser of ``dataset``.

    Args:
        dataset: an ``optden.Dataset`` (M rows of dimension d).
        device: torch device the computation runs on ("cpu", "cuda", "cuda:1", ...).
        backend: "auto" (fastest usable), or a name from ``optden.info()["backends"]``.
        tol: target relative error of D* (default 1e-6; the contract is 1e-5).
        topk: how many top rows each pass keeps for the certificate and the top weights
            (default 64; D*, the score and the log density keep one on backends whose
            bound certifies without them, see ``Backend.delta_target``).
        block_rows: rows per block (default: about 16 MB of float64 per block).
        resident: keep the raw rows on the device ("auto": when they fit half its
            free memory, for accelerators; CPU datasets are always used in place).
        prune: certified pruning (``optden.prune``): "off" (dense passes only),
            "embedding" / "flat" / "ivf" (that index: loaded from beside the dataset,
            else built), an ``EmbeddingIndex`` or ``PruneIndex``, or "auto" (the index
            saved beside the dataset by ``optden index``, the embedding first, if there
            is one; else off: nothing is built implicitly). Pruned evaluations are
            certified to ``tol``; queries the index cannot certify, and class-conditional
            ones, run dense.
        prune_policy: "auto" (``optden.prune.PrunePolicy``: per evaluation and group of
            queries at one sigma, search or run dense, whichever its cost model expects
            faster; cache hits are always used) or "always" (search every query).
            Default: "auto" with prune="auto", "always" with a named kind or an index.

    Call it like an EDM / k-diffusion model: ``den(x, sigma)`` or EDM's
    ``den(x, sigma, class_labels)``, with x (B, ...) of any shape whose trailing size is
    d and sigma a scalar or (B,); it carries EDMPrecond's attributes (``sigma_min``,
    ``sigma_max``, ``round_sigma``, ``img_channels``, ``img_resolution``, ``label_dim``),
    so EDM's and k-diffusion's samplers run it unchanged.
    """

    def __init__(
        self,
        dataset,
        device="cpu",
        backend: str = "auto",
        tol: float = DEFAULT_TOL,
        topk: int = 64,
        block_rows: int | None = None,
        resident="auto",
        prune="auto",
        prune_policy: str | None = None,
    ):
        if dataset is None or not hasattr(dataset, "raw_block"):
            raise DtypeError(f"dataset: expected an optden.Dataset, got {type(dataset).__name__}")
        if dataset.M < 1 or dataset.d < 1:
            raise DatasetError(f"dataset: is empty (M={dataset.M}, d={dataset.d})")
        if not (isinstance(tol, float | int) and 0 < tol < 1):
            raise InputError(f"tol: expected a number in (0, 1), got {tol!r}")
        self.dataset = dataset
        self.device = check_device(device)
        self.tol = float(tol)
        self.topk = check_positive_int(topk, "topk")
        self.block_rows = (
            check_positive_int(block_rows, "block_rows")
            if block_rows is not None
            else max(1, (1 << 21) // dataset.d)
        )
        self.backend_name = backend
        self.backend = dispatch.select(backend, self.device, dataset.dtype, dataset.d)
        self._resident = self._decide_resident(resident)
        self._sources: dict = {}
        # --- pruning (optden.prune): resolved lazily on the first unconditional call
        if not (prune in ("auto", "off", "flat", "ivf", "embedding") or _is_index(prune)):
            raise InputError(f"prune: expected 'auto', 'off', 'embedding', 'flat', 'ivf', an EmbeddingIndex or a "
                             f"PruneIndex, got {prune!r}")
        if prune_policy is None:
            prune_policy = "auto" if prune == "auto" else "always"
        if prune_policy not in ("auto", "always"):
            raise InputError(f"prune_policy: expected None, 'auto' or 'always', got {prune_policy!r}")
        if _is_index(prune):
            if getattr(prune, "M", None) != dataset.M:
                raise DatasetError(f"prune: the index holds {getattr(prune, 'M', '?')} rows, the dataset {dataset.M}")
            if getattr(prune, "fingerprint", None) != dataset.fingerprint:
                raise DatasetError("prune: the index was built for other rows than this dataset's")
        self.prune = prune
        self.prune_policy = prune_policy
        self._pruner = None
        self._policy = None
        self._chosen = []

    # ------------------------------------------------------------------ properties
    @property
    def M(self) -> int:
        return self.dataset.M

    @property
    def d(self) -> int:
        return self.dataset.d

    @property
    def image_shape(self) -> tuple:
        return tuple(self.dataset.image_shape)

    # EDM's face (its ``EDMPrecond``): what EDM's generate.py and tools built on it read.
    #: The noise levels a sampler may use: no restriction (EDMPrecond's defaults); a sigma
    #: whose logits float64 cannot represent (about 1e-150 < sigma < 1e150) is an InputError.
    sigma_min = 0.0
    sigma_max = math.inf

    @property
    def label_dim(self) -> int:
        """Number of classes, 0 for an unconditional data set (EDM's ``label_dim``)."""
        return int(self.dataset.num_classes or 0) if self.dataset.labels is not None else 0

    @property
    def img_channels(self) -> int | None:
        """Channels C of (C, H, W) images (EDM's ``img_channels``); None for rows that are not images."""
        return self.image_shape[0] if len(self.image_shape) == 3 else None

    @property
    def img_resolution(self):
        """H of square (C, H, H) images (EDM's ``img_resolution``); (H, W) when not square; None
        for rows that are not images."""
        if len(self.image_shape) != 3:
            return None
        h, w = self.image_shape[1:]
        return h if h == w else (h, w)

    def round_sigma(self, sigma):
        """EDM's ``round_sigma``: every sigma is supported as is."""
        return torch.as_tensor(sigma)

    def __repr__(self) -> str:
        return (
            f"OptimalDenoiser(M={self.M}, d={self.d}, dtype={self.dataset.dtype}, device={self.device}, "
            f"backend={self.backend.name!r}, tol={self.tol:g})"
        )

    def _decide_resident(self, resident) -> bool:
        if resident is True or resident is False:
            return resident
        if resident != "auto":
            raise InputError(f"resident: expected True, False or 'auto', got {resident!r}")
        if self.device.type != "cuda":
            return False
        nbytes = self.M * self.d * STORAGE_DTYPES[self.dataset.dtype].itemsize
        free, _ = torch.cuda.mem_get_info(self.device)
        return nbytes < free // 2

    def source(self, label: int | None = None) -> RowSource:
        """The row source of all rows, or of the rows with class ``label``."""
        if label not in self._sources:
            index = None if label is None else self.dataset.rows_with_label(label)
            if index is not None and len(index) == 0:
                raise InputError(f"labels: class {label} has no rows in the dataset")
            self._sources[label] = RowSource(
                self.dataset, self.device, self.block_rows, index=index, resident=self._resident
            )
        return self._sources[label]

    def pruner(self):
        """The ``optden.prune.Pruner`` in use, or None (prune="off", or "auto" found none)."""
        if self._pruner is None and self.prune != "off":
            ds = self.dataset
            index = None
            if _is_index(self.prune):
                index = self.prune
            elif self.prune == "embedding":
                index = EmbeddingIndex.load(ds) if EmbeddingIndex.exists(ds) else EmbeddingIndex.build(ds)
            elif self.prune in ("flat", "ivf"):
                index = (PruneIndex.load(ds, self.prune) if PruneIndex.exists(ds, self.prune)
                         else PruneIndex.build(ds, self.prune))
            elif EmbeddingIndex.exists(ds):  # auto
                index = EmbeddingIndex.load(ds)
            else:
                for kind in ("ivf", "flat"):
                    if PruneIndex.exists(ds, kind):
                        index = PruneIndex.load(ds, kind)
                        break
            if index is None:
                self.prune = "off"
                return None
            self._pruner = Pruner(index, self.source(None), tol=self.tol)
            if self.prune_policy == "auto":
                self._policy = PrunePolicy(index, self._pruner.tol_mass, STORAGE_DTYPES[ds.dtype].itemsize)
        return self._pruner

    def _search_choice(self, sigma: torch.Tensor, n_all: int):
        """The policy's choice as the pruner's ``search`` callback: positions (m,) -> (m,) bool,
        decided per group of queries at one sigma (None: search them all)."""
        pol = self._policy
        if pol is None:
            return None
        if pol.nn_sample() .size == 0 and isinstance(self._pruner.index, EmbeddingIndex):
            pol.nn_sample(self._nearest_rows)

        def choose(pos: torch.Tensor) -> torch.Tensor:
            sig = sigma[pos].cpu() / self.dataset.scale  # raw units
            out = torch.zeros(pos.numel(), dtype=torch.bool)
            for val in sig.unique().tolist():
                grp = sig == val
                out[grp] = go = pol.choose(val, int(grp.sum()))
                self._chosen.append((val, int(grp.sum()), go))
            return out

        self._chosen = []  # (sigma raw, queries, pruned) of this evaluation, for record_evaluation

        return choose

    def _nearest_rows(self, v: torch.Tensor, k: int):
        """The embedding index's certified exact k nearest rows of centered raw queries v (n, d):
        ``(d2 (n, k), idx (n, k), ok (n,))`` (see ``EmbeddingIndex.certified_nearest``)."""
        pr = self._pruner
        src = self.source(None)
        return pr.index.certified_nearest(v, k, lambda sel, idx: exact_sq_distances(v[sel], src, idx),
                                          max_scan=pr.max_scan_nearest_frac * pr.index.M)

    def _fallback(self, src: RowSource, k: int):
        """The float64 torch pass behind a faster, less precise backend (None for torch)."""
        if self.backend.name == "torch":
            return None
        precise = dispatch.get("torch")
        return lambda v, coef: precise.partial(v, coef, src, k)

    def _pass(self, v: torch.Tensor, coef: torch.Tensor, src: RowSource, k: int):
        """The backend's ``Partial`` of v (n, d) with coef (n,); queries at sigma = inf
        (coef = 0: every logit 0, uniform weights, which the fused passes refuse) run the
        float64 torch pass."""
        flat = coef == 0
        if not bool(flat.any()):
            return self.backend.partial(v, coef, src, k)
        uniform = dispatch.get("torch")
        if bool(flat.all()):
            return uniform.partial(v, coef, src, k)
        parts = ((~flat, self.backend.partial(v[~flat], coef[~flat], src, k)),
                 (flat, uniform.partial(v[flat], coef[flat], src, k)))
        out = Partial.empty(v.shape[0], v.shape[1], parts[0][1].k, v.device)
        for rows, part in parts:
            for name in ("m", "s", "acc", "top_val", "top_idx", "delta"):
                getattr(out, name)[rows] = getattr(part, name).to(getattr(out, name).dtype)
        return out

    def _one_top_row(self, kk: int, need_top: bool) -> bool:
        """Whether a pass may keep one top row instead of kk (see ``_certified_pass``)."""
        target = self.backend.delta_target()
        return not need_top and kk > 1 and target is not None and target <= dense_threshold(self.tol)

    def _certified_pass(self, v: torch.Tensor, coef: torch.Tensor, src: RowSource, kk: int, need_top: bool,
                        part=None, query=None) -> Certified:
        """The backend's pass over src, certified. v: (n, d) centered raw queries, coef: (n,).

        With need_top False (the caller keeps no top weights) and a backend whose bound
        makes the pass DENSE without its top K (``Backend.delta_target``), the pass keeps
        one top row, and only the queries whose bound came out loose run again with kk:
        a top-K heap per query costs up to ~20% of a pass at small N. The result then has
        K = 1 (top_w, top_idx (n, 1)); otherwise K = kk. part: that one-top-row pass, when
        the caller has already run it. query: the ``gaps.CenteredQuery`` of v, passed on to
        ``certify``.
        """
        if not self._one_top_row(kk, need_top):
            return certify(self._pass(v, coef, src, kk), v, coef, src, self.tol,
                           fallback=self._fallback(src, kk), query=query)
        if part is None:
            part = self._pass(v, coef, src, 1)
        dense = self._dense(part, coef, src, query)
        redo = None if bool(dense.all()) else (~dense).nonzero().flatten()
        if redo is not None:  # their results come from the pass with kk rows below: certify them DENSE here
            part.delta = torch.where(dense, part.delta, torch.full_like(part.delta, -torch.inf))
        cert = certify(part, v, coef, src, self.tol, query=query)  # DENSE for all but the redo queries
        if redo is not None:
            sub = self._certified_pass(v[redo], coef[redo], src, kk, True,
                                       query=None if query is None else query[redo])
            for name in ("dc", "lse", "excluded", "mode", "delta"):
                getattr(cert, name)[redo] = getattr(sub, name)
            cert.top_w[redo], cert.top_idx[redo] = sub.top_w[:, :1], sub.top_idx[:, :1]
        return cert

    def _dense(self, part, coef, src: RowSource, query) -> torch.Tensor:
        """(n,) bool: the pass certifies DENSE for the exact queries (False for a NaN bound).
        The conversion error of the queries is first bounded by one number for the batch (two
        reductions); per query only when that leaves a query short of DENSE."""
        thr = dense_threshold(self.tol)
        if query is None:
            return part.delta <= thr
        slack = float(query_delta(float(coef.max()), src.max_cnorm, query.error_max()))
        dense = part.delta <= thr - slack
        if not bool(dense.all()):
            dense = (part.delta + query_delta(coef, src.max_cnorm, query.error_norm())) <= thr
        return dense

    def _centered(self, u: torch.Tensor, u_lo, src: RowSource):
        """Model-space queries u (n, d) (+ residual u_lo) -> ``gaps.CenteredQuery`` (its v:
        the centered raw queries). InputError when (u - offset) / scale overflows float64."""
        q = centered_query(u, u_lo, self.dataset.offset, self.dataset.scale, src.center, src.center_norm)
        if not _all_finite(q.v):
            big = float(u[~torch.isfinite(q.v).all(1)].abs().max())
            raise InputError(f"x: a query value of magnitude {big:g} is beyond float64 in the data's raw units "
                             f"((x - offset) / scale with scale {self.dataset.scale:g} overflows)")
        return q

    # ------------------------------------------------------------------ core
    def _queries(self, x, s, name="x"):
        """Validate x (B, ...) and the scale s; return u = x / s as (B, d) float64 on device."""
        t, u, _ = self._scaled_queries(x, s, name)
        return t, u

    def _scaled_queries(self, x, s, name="x"):
        """``_queries`` plus u_lo, the residual of the division by s (None for s = 1): (B, d)."""
        t = check_queries(x, self.d, name)
        n = t.shape[0]
        u = t.reshape(n, self.d).to(self.device, torch.float64)
        u_lo = None
        if not (isinstance(s, (int, float)) and not isinstance(s, bool) and s == 1):
            sc = check_sigma(s, n, name="s", allow_inf=False).to(self.device)
            u, u_lo = divide(u, None, sc[:, None])
        return t, u, u_lo

    def _labels(self, class_labels, labels, n: int):
        """Class labels of n queries -> int64 (n,) CPU, or None (unconditional).

        class_labels (EDM's name) or its alias labels: None, one class for all, (n,)
        class indices, or EDM's one-hot vectors (n, label_dim) (or (1, label_dim) for all).
        """
        if class_labels is not None and labels is not None:
            raise InputError("class_labels: given together with its alias labels; pass one of them")
        name = "labels" if class_labels is None else "class_labels"
        given = labels if class_labels is None else class_labels
        if given is None:
            return None
        lab = as_tensor(given, name)
        nc = self.label_dim
        if lab.dim() == 2 and nc > 1 and lab.shape[1] == nc:  # EDM's one-hot class vectors
            lab = one_hot_to_index(lab, name, nc)
        if lab.is_floating_point() and not bool((lab == lab.round()).all()):
            raise InputError(f"{name}: expected integer class labels")
        lab = lab.to(torch.int64).reshape(-1)
        if lab.numel() == 1:
            lab = lab.expand(n)
        if lab.numel() != n:
            raise InputError(f"{name}: expected a scalar or one label per query ({n}), got {lab.numel()}")
        if self.dataset.labels is None:
            raise InputError(f"{name}: this dataset has no labels, so class-conditional evaluation is impossible")
        if bool((lab < 0).any()) or bool((lab >= nc).any()):
            raise InputError(f"{name}: expected labels in 0..{nc - 1}, got values in {int(lab.min())}..{int(lab.max())}")
        return lab.cpu()

    def _coef(self, sigma: torch.Tensor) -> torch.Tensor:
        """The logits' 1 / (2 sigma^2) in raw units, (N,) float64 on the device; sigma: (N,)."""
        sig = sigma.to(self.device, torch.float64)
        coef = (self.dataset.scale**2) / (2.0 * sig**2)
        # sigma = inf gives coef = 0: every logit 0, uniform weights, D* is the (class) mean
        ok = ((coef > 0) | (sig == math.inf)) & (coef < math.inf)  # False for NaN too
        if not bool(ok.all()):
            bad = float(sig[~ok][0])
            raise InputError(
                f"sigma: {bad:g} is outside the range float64 logits can represent "
                f"(1 / (2 sigma^2) must be finite and > 0: about 1e-150 < sigma < 1e150, or sigma = inf)"
            )
        return coef

    def _denoised(self, u: torch.Tensor, sigma: torch.Tensor, labels=None, u_lo=None) -> torch.Tensor:
        """D* (N, d) float64 in model space: ``evaluate(u, sigma, labels, need_top=False).denoised``.

        u: (N, d) float64 model-space queries on the device; sigma: (N,) float64; labels:
        None or (N,) int64. A plain call (no labels, no pruning) whose one-top-row pass
        certifies every query DENSE skips evaluate's top weights, log densities, bounds
        and modes: the numbers are the same, in ~15 fewer tensor ops (a call at N = 1..8
        spends ~1 ms in Python on caches the pass has just flushed). u_lo: the residual of u
        (``_scaled_queries``), or None.
        """
        if labels is not None or self.pruner() is not None:
            return self.evaluate(u, sigma, labels, need_top=False, u_lo=u_lo).denoised
        ds, src = self.dataset, self.source(None)
        coef = self._coef(sigma)
        q = self._centered(u, u_lo, src)
        v = q.v
        kk = min(self.topk, src.M)
        part = self._pass(v, coef, src, 1) if self._one_top_row(kk, False) else None
        if part is not None and bool(self._dense(part, coef, src, q).all()):
            dc = part.mean()  # certify's dc of a DENSE query
        else:
            cert = self._certified_pass(v, coef, src, kk, False, part=part, query=q)
            self._check_certified(cert.excluded, cert.dc, sigma)
            dc = cert.dc
        return (dc + src.center) * ds.scale + ds.offset

    def _check_certified(self, bound: torch.Tensor, values: torch.Tensor, sigma: torch.Tensor) -> None:
        """Raise PrecisionError for any query whose certified bound (N,) exceeds tol or whose
        values (N, d) are not finite: never a silent uncertified result."""
        bad = ~(bound <= self.tol) | ~torch.isfinite(values).all(1)
        if bool(bad.any()):
            j = int(bad.nonzero()[0])
            raise PrecisionError(
                f"sigma: the result for query {j} at sigma={float(sigma[j]):g} cannot be certified to "
                f"tol={self.tol:g} in float64 (bound {float(bound[j]):g}): at this sigma and query, rounding "
                "cannot tell the training rows that carry the weight apart; use a larger sigma, or a query "
                "nearer the data")

    def evaluate(self, u: torch.Tensor, sigma: torch.Tensor, labels=None, k: int | None = None,
                 need_top: bool = True, u_lo=None) -> Evaluation:
        """Certified evaluation of validated inputs.

        u: (N, d) float64 queries in model space (already divided by s), on ``self.device``.
        sigma: (N,) float64 positive. labels: None or (N,) int64 CPU.
        k: top weights to return (default ``self.topk``, capped by the rows available).
        need_top: False when the caller keeps no top weights (D*, the score, the log
        density): the evaluation may then return only the top one (top_w (N, 1)).
        u_lo: (N, d) the residual of u (what rounding x / s left out), or None.
        """
        n = u.shape[0]
        ds = self.dataset
        k_req = self.topk if k is None else max(k, 1)
        if not need_top:
            k_req, k = 1, None
        # poisoned: any entry no group writes shows up as NaN
        denoised = torch.full((n, self.d), torch.nan, dtype=torch.float64, device=self.device)
        lse = torch.full((n,), torch.nan, dtype=torch.float64, device=self.device)
        bound = torch.full((n,), torch.nan, dtype=torch.float64, device=self.device)
        # (label, query positions); None: all n queries in order, taken by slicing (an index
        # tensor would copy the inputs and scatter the results, ~7% of the Python time of
        # a call with one query)
        groups = [(None, None)] if labels is None else [
            (int(c), (labels == c).nonzero().flatten()) for c in labels.unique().tolist()
        ]
        k_out = min(k_req, min(self.source(c).M for c, _ in groups))
        top_w = torch.full((n, k_out), torch.nan, dtype=torch.float64, device=self.device)
        top_idx = torch.zeros(n, k_out, dtype=torch.int64, device=self.device)
        modes = [""] * n
        coef_all = self._coef(sigma)
        pr = self.pruner() if labels is None else None
        t_call = time.perf_counter()
        if pr is not None:  # certified pruned path; what it cannot certify runs dense below
            src = self.source(None)
            v = self._centered(u, u_lo, src).v
            res = pr.evaluate(v, coef_all, k_out, k_need=1 if k is None else k_out,
                              search=self._search_choice(sigma, n))
            if self._policy is not None and pr.last["searched"]:
                self._policy.record_pruned(float(sigma[0]) / ds.scale, pr.last["searched"], pr.last["certified"],
                                           pr.last["seconds"])
            okd = res.ok
            denoised[okd] = (res.dc[okd] + src.center) * ds.scale + ds.offset
            lse[okd], bound[okd] = res.lse[okd], res.bound[okd]
            top_w[okd] = res.top_w[okd]
            ti = res.top_idx[okd]
            top_idx[okd] = torch.where(ti >= 0, src.global_index(ti.clamp(min=0)), ti)
            for j in okd.nonzero().flatten().tolist():
                modes[j] = "cached" if bool(res.cached[j]) else "pruned"
            groups = [(None, (~okd).nonzero().flatten().cpu())]
        for label, qi in groups:
            if qi is not None and qi.numel() == 0:
                continue
            src = self.source(label)
            kk = min(max(k_req, self.topk), src.M)
            qd = slice(None) if qi is None else qi.to(self.device)
            q = self._centered(u[qd], _rows_of(u_lo, qd), src)
            v = q.v
            coef = coef_all[qd]
            t0 = time.perf_counter()
            cert = self._certified_pass(v, coef, src, kk, need_top, query=q)
            if self._policy is not None and label is None:
                self._policy.record_dense(v.shape[0], time.perf_counter() - t0)
            denoised[qd] = (cert.dc + src.center) * ds.scale + ds.offset
            # logits of the model-space distances are the same numbers: coef folds in scale^2
            lse[qd] = cert.lse
            bound[qd] = cert.excluded
            top_w[qd] = cert.top_w[:, :k_out]
            top_idx[qd] = src.global_index(cert.top_idx[:, :k_out])
            for j, mval in zip(range(n) if qi is None else qi.tolist(), cert.mode.tolist()):
                modes[j] = MODE_NAMES[mval]
        if self._policy is not None and pr is not None and self._chosen:
            # the whole evaluation (search and fallback pass) is what the choice cost; a
            # batch of several sigma shares it by queries
            spent = time.perf_counter() - t_call
            chosen = sum(c for _, c, _ in self._chosen)
            for val, cnt, go in self._chosen:  # queries the cache answered count with their group
                self._policy.record_evaluation(val, n * cnt / chosen, spent * cnt / chosen, go)
            self._chosen = []
        self._check_certified(bound, denoised, sigma)
        return Evaluation(denoised, lse, top_w, top_idx, bound, modes)

    # ------------------------------------------------------------------ public API
    def __call__(self, x, sigma, class_labels=None, *, s=1.0, labels=None):
        """D*(x / s; sigma): same shape and dtype as x (computed in float64).

        x: (B, ...) with prod(...) == d; sigma: scalar or (B,); class_labels (EDM's
        ``net(x, sigma, class_labels)``; ``labels`` is an alias): None, a class, (B,)
        classes or (B, label_dim) one-hot vectors, for class-conditional denoising;
        s: scalar or (B,), EDM's scaling (VE: 1).
        With x (or sigma, s) taking part in autograd (``requires_grad``, forward-mode
        tangents, ``torch.func``), D* is differentiable: its derivatives are the exact
        posterior moments (``optden.autograd``), the result in x's dtype.
        """
        if autograd.needs_autograd(x, sigma, s):
            t, u, ops = self._differentiable(x, s, class_labels, labels)
            return autograd.denoise(u, sigma, *ops[:2]).reshape(t.shape).to(t.dtype)
        t, u, u_lo = self._scaled_queries(x, s)
        sig = check_sigma(sigma, u.shape[0])
        out = self._denoised(u, sig, self._labels(class_labels, labels, u.shape[0]), u_lo)
        return out.reshape(t.shape).to(t.dtype if t.is_floating_point() else torch.float64)

    def denoise_certified(self, x, sigma, class_labels=None, *, s=1.0, labels=None) -> Evaluation:
        """Like ``__call__`` but returns the full ``Evaluation`` (bound and mode per query)."""
        _, u, u_lo = self._scaled_queries(x, s)
        sig = check_sigma(sigma, u.shape[0])
        return self.evaluate(u, sig, self._labels(class_labels, labels, u.shape[0]), u_lo=u_lo)

    def score(self, x, sigma, class_labels=None, *, s=1.0, labels=None):
        """grad log p_sigma(u) = (D*(u) - u) / sigma^2 at u = x / s: same shape as x, float64
        (differentiable through D* when x, sigma or s take part in autograd)."""
        if autograd.needs_autograd(x, sigma, s):
            t, u, ops = self._differentiable(x, s, class_labels, labels)
            D = autograd.denoise(u, sigma, *ops[:2])
            sig = sigma.to(D.device, torch.float64).reshape(-1, 1) if isinstance(sigma, torch.Tensor) else float(sigma)
            return ((D - u.to(torch.float64)) / sig**2).reshape(t.shape)
        t, u, u_lo = self._scaled_queries(x, s)
        sig = check_sigma(sigma, u.shape[0]).to(self.device)
        out = self._denoised(u, sig, self._labels(class_labels, labels, u.shape[0]), u_lo)
        return ((out - u) / sig[:, None] ** 2).reshape(t.shape)

    def log_density(self, x, sigma, class_labels=None, *, s=1.0, labels=None):
        """log p_sigma(u) of the smoothed empirical distribution (of the class, if labels): (B,) float64
        (differentiable, with the score and d log p / d sigma as derivatives, when x, sigma or s
        take part in autograd)."""
        if autograd.needs_autograd(x, sigma, s):
            _, u, ops = self._differentiable(x, s, class_labels, labels)
            return autograd.log_density(u, sigma, *ops)
        _, u, u_lo = self._scaled_queries(x, s)
        sig = check_sigma(sigma, u.shape[0]).to(self.device)
        lab = self._labels(class_labels, labels, u.shape[0])
        ev = self.evaluate(u, sig, lab, need_top=False, u_lo=u_lo)
        if lab is None:
            m = torch.full_like(sig, float(self.M))
        else:
            counts = torch.tensor([float(self.source(int(c)).M) for c in lab.tolist()], dtype=torch.float64)
            m = counts.to(self.device)
        return ev.lse - torch.log(m) - 0.5 * self.d * torch.log(2.0 * math.pi * sig**2)

    def posterior(self, x, sigma, k: int = 8, class_labels=None, *, s=1.0, labels=None):
        """The k largest weights w_i(u; sigma) and their dataset row indices.

        Returns ``(weights (B, k) float64, indices (B, k) int64)``, descending.
        """
        _, u, u_lo = self._scaled_queries(x, s)
        n = u.shape[0]
        lab = self._labels(class_labels, labels, n)
        avail = self.M if lab is None else min(self.source(int(c)).M for c in lab.unique().tolist())
        k = check_positive_int(k, "k", 1, avail)
        sig = check_sigma(sigma, n)
        ev = self.evaluate(u, sig, lab, k=k, u_lo=u_lo)
        return ev.top_w[:, :k], ev.top_idx[:, :k]

    def nearest(self, x, k: int = 2, class_labels=None, *, labels=None):
        """Exact k nearest training rows in model space.

        Returns ``(distances (B, k) float64, indices (B, k) int64)``, ascending. Certified
        like the denoiser: coarse distances, then an exact re-score of the candidates.
        """
        _, u = self._queries(x, 1.0)
        n = u.shape[0]
        lab = self._labels(class_labels, labels, n)
        ds = self.dataset
        groups = [(None, torch.arange(n))] if lab is None else [
            (int(c), (lab == c).nonzero().flatten()) for c in lab.unique().tolist()
        ]
        avail = min(self.source(c).M for c, _ in groups)
        k = check_positive_int(k, "k", 1, avail)
        dist = torch.full((n, k), torch.nan, dtype=torch.float64, device=self.device)
        idx = torch.empty(n, k, dtype=torch.int64, device=self.device)
        pr = self.pruner() if lab is None else None
        if pr is not None and isinstance(pr.index, EmbeddingIndex):  # certified exact neighbours, pruned
            src = self.source(None)
            v = (u - ds.offset) / ds.scale - src.center
            d2, ii, ok = self._nearest_rows(v.cpu(), k)
            ok = ok.to(self.device)
            dist[ok] = torch.sqrt(torch.clamp(d2.to(self.device)[ok], min=0.0)) * ds.scale
            idx[ok] = ii.to(self.device)[ok]
            groups = [(None, (~ok).nonzero().flatten().cpu())]
        for label, qi in groups:
            if qi.numel() == 0:
                continue
            src = self.source(label)
            kk = min(src.M, max(4 * k, 16))
            qd = qi.to(self.device)
            q = self._centered(u[qd], None, src)
            v, (v_lo, _) = q.v, q.residual()
            coef = torch.ones(v.shape[0], dtype=torch.float64, device=self.device)
            part = self.backend.partial(v, coef, src, kk)
            best, order = (-candidate_sqdist(v, src, part.top_idx, v_lo)).topk(k, dim=1)  # -||v - q||^2
            cand = part.top_idx.gather(1, order)
            # rows outside the candidates: -||v-q||^2 <= top_val[K-1] + delta (an overflowing
            # pass, with non-finite logits, proves nothing: its positions may be padding)
            slack = part.delta + query_delta(coef, src.max_cnorm, q.error_norm())
            ok = torch.isfinite(part.top_val).all(1) & ((kk >= src.M) | (part.top_val[:, -1] + slack < best[:, -1]))
            for j in (~ok).nonzero().flatten().tolist():
                ex, ref_sq, _ = exact_pass(v[j : j + 1], coef[j : j + 1], src, k, v_lo=v_lo[j : j + 1])
                best[j], cand[j] = ex.top_val[0] - ref_sq[0], ex.top_idx[0]
            dist[qd] = torch.sqrt(torch.clamp(-best, min=0.0)) * ds.scale
            idx[qd] = src.global_index(cand)
        return dist, idx

    # ------------------------------------------------------------------ what the posterior says
    def diagnostics(self, x, sigma, class_labels=None, *, k: int | None = None, s=1.0, labels=None) -> Diagnostics:
        """How concentrated the posterior is at u = x / s, certified, from the pass that computes D*.

        Returns ``optden.posterior.Diagnostics``: per query the effective sample size, the
        weights' entropy, the largest weight and the mass of the k heaviest rows, log
        p_sigma(u) and d log p_sigma(u) / d sigma, the index of the heaviest row, D* itself,
        each with a certified error bound (``optden.engine.stats``; the contract of
        docs/design.md, section 2, at this denoiser's ``tol``). Same arguments as
        ``__call__``; k: the top-mass count (1 <= k <= the rows available; default
        min(10, rows available)). Runs dense
        passes (no pruning); a memorization alarm is ``max_weight -> 1``, ``ess -> 1``.
        """
        _, u = self._queries(x, s)
        n = u.shape[0]
        sig = check_sigma(sigma, n).to(self.device)
        return self._diagnose(u, sig, self._labels(class_labels, labels, n), k)

    def _stats_pass(self, v: torch.Tensor, coef: torch.Tensor, src: RowSource, kk: int) -> Certified:
        """A certified pass that accumulates the pass statistics: the backend's when it
        declares them (``Backend.statistics``), else the float64 torch pass."""
        b = dispatch.statistics_backend(self.backend)
        precise = dispatch.get("torch")
        fb = None if b is precise else (lambda vv, cc: precise.partial(vv, cc, src, kk, stats=True))
        return certify(b.partial(v, coef, src, kk, stats=True), v, coef, src, self.tol, fallback=fb)

    def _diagnose(self, u: torch.Tensor, sig: torch.Tensor, lab, k: int) -> Diagnostics:
        """``diagnostics`` of validated inputs: u (N, d) model space on the device, sig (N,)."""
        if getattr(self, "is_distributed", False):
            raise InputError("diagnostics: not available on a ShardedDenoiser (its ranks merge no pass statistics); "
                             "use an OptimalDenoiser")
        n, ds = u.shape[0], self.dataset
        groups = [(None, None)] if lab is None else [
            (int(c), (lab == c).nonzero().flatten()) for c in lab.unique().tolist()]
        avail = min(self.source(c).M for c, _ in groups)
        k = min(10, avail) if k is None else check_positive_int(k, "k", 1, avail)
        pure = sig == math.inf
        if bool(pure.any()):  # sigma = inf: uniform weights, known without a pass
            return self._diagnose_pure_noise(u, sig, lab, k, pure)
        coef_all = self._coef(sig)
        out = None if lab is None else Diagnostics.empty(n, self.d, k, self.device)
        for label, qi in groups:
            src = self.source(label)
            kk = min(max(k, self.topk), src.M)
            # one group of all queries (no labels): slices, and its Diagnostics is the result
            idx = None if qi is None else qi.tolist()
            qd = slice(None) if qi is None else qi.to(self.device)
            v = (u[qd] - ds.offset) / ds.scale - src.center
            coef, sg = coef_all[qd], sig[qd]
            rows = torch.full_like(sg, float(src.M))
            cert = self._stats_pass(v, coef, src, kk)
            diag = diagnostics_from(cert.stats, (cert.dc + src.center) * ds.scale + ds.offset, sg, rows, self.d, k,
                                    src.global_index(cert.top_idx[:, 0]), [MODE_NAMES[m] for m in cert.mode.tolist()],
                                    self.tol)
            # bounds over the contract (a logit bound at the DENSE threshold, a left-out mass near
            # tol_mass): the exact float64 pass, a few queries at a time
            redo = (~diag.certified & (cert.mode != EXACT)).nonzero().flatten().tolist()
            for a in range(0, len(redo), 8):
                j = torch.tensor(redo[a:a + 8], dtype=torch.int64, device=self.device)
                part, ref_sq, _ = exact_pass(v[j], coef[j], src, kk, stats=True)
                ex = absolute(part, coef[j], ref_sq)  # logits relative to the nearest row -> absolute
                st = from_exact(ex, src.M, coef[j], v[j].norm(dim=1), query_shift(v[j], src.center), src.max_cnorm,
                                self.d)
                sub = diagnostics_from(st, (ex.mean() + src.center) * ds.scale + ds.offset, sg[j], rows[j], self.d, k,
                                       src.global_index(ex.top_idx[:, 0]), ["exact"] * j.numel(), self.tol)
                diag.put(redo[a:a + 8], sub)
            if out is None:
                return diag
            out.put(idx, diag)
        return out

    def _diagnose_pure_noise(self, u: torch.Tensor, sig: torch.Tensor, lab, k: int, pure: torch.Tensor) -> Diagnostics:
        """``_diagnose`` of queries some of which (``pure``, (N,) bool) are at sigma = inf:
        those from ``uniform_diagnostics``, the others from their pass."""
        n = u.shape[0]
        out = Diagnostics.empty(n, self.d, k, self.device)
        rest = (~pure).nonzero().flatten()
        if rest.numel():
            out.put(rest.tolist(), self._diagnose(u[rest], sig[rest], None if lab is None else lab[rest], k))
        flat = pure.nonzero().flatten()
        fl = None if lab is None else lab[flat.cpu()]
        srcs = [self.source(None if fl is None else int(c)) for c in (fl.tolist() if fl is not None else [None] * len(flat))]
        rows = torch.tensor([float(sr.M) for sr in srcs], dtype=torch.float64, device=self.device)
        first = torch.stack([sr.global_index(torch.zeros(1, dtype=torch.int64, device=self.device))[0] for sr in srcs])
        out.put(flat.tolist(), uniform_diagnostics(self._denoised(u[flat], sig[flat], fl), rows, self.d, k, first))
        return out

    def posterior_cov(self, x, sigma, class_labels=None, *, s=1.0, labels=None,
                      memory_budget: int = 1 << 28) -> PosteriorCov:
        """The posterior covariance ``Cov[y | u]`` at u = x / s (model units), certified:
        ``.matvec(v)`` (batched over v), ``.eig(k)``, ``.bound`` (see
        ``optden.posterior.PosteriorCov``); ``dD*/du = Cov / sigma^2``. Same arguments as
        ``__call__``; memory_budget: bytes of float64 support rows held for all queries
        (a query whose rows do not fit streams them at every product).
        """
        _, u = self._queries(x, s)
        n = u.shape[0]
        sig = _finite_sigma(check_sigma(sigma, n), "posterior_cov").to(self.device)
        return self._posterior_cov(u, sig, self._labels(class_labels, labels, n), memory_budget)

    def _posterior_cov(self, u: torch.Tensor, sig: torch.Tensor, lab, memory_budget: int) -> PosteriorCov:
        if getattr(self, "is_distributed", False):
            raise InputError("posterior_cov: not available on a ShardedDenoiser; use an OptimalDenoiser")
        n, ds = u.shape[0], self.dataset
        groups = [(None, None)] if lab is None else [
            (int(c), (lab == c).nonzero().flatten()) for c in lab.unique().tolist()]
        coef_all = self._coef(sig)
        denoised = torch.full((n, self.d), torch.nan, dtype=torch.float64, device=self.device)
        cov = PosteriorCov(self.d, ds.scale, sig, denoised, [""] * n)
        for label, qi in groups:
            src = self.source(label)
            idx = list(range(n)) if qi is None else qi.tolist()
            qd = torch.tensor(idx, dtype=torch.int64, device=self.device)
            v = (u[qd] - ds.offset) / ds.scale - src.center
            cert = self._stats_pass(v, coef_all[qd], src, min(self.topk, src.M))
            denoised[qd] = (cert.dc + src.center) * ds.scale + ds.offset
            for j, m in zip(idx, cert.mode.tolist()):
                cov.mode[j] = MODE_NAMES[m]
            cov.add_group(idx, src, v, coef_all[qd], cert, self.tol, memory_budget)
        return cov

    # ------------------------------------------------------------------ autograd (optden.autograd)
    def _differentiable(self, x, s, class_labels, labels):
        """(x, u = x / s as (B, d), (forward, cov, diagnose)) for a call inside autograd: the
        shapes are checked here (x may be a torch.func-wrapped tensor); the values, on the
        plain tensors the Functions see, by the closures."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise DtypeError("x: a differentiable call needs a floating torch tensor")
        n = x.shape[0] if x.dim() else 0
        if n == 0 or x.numel() != n * self.d:
            raise InputError(f"x: expected a non-empty batch (B, ...) of {self.d} values per query, got shape "
                             f"{tuple(x.shape)}")
        u = x.reshape(n, self.d)
        if isinstance(s, torch.Tensor):
            u = u / s.to(u.dtype).reshape(-1, 1)
        elif not (isinstance(s, (int, float)) and s == 1):
            u = u / check_sigma(s, n, name="s").to(u.device, u.dtype)[:, None]
        lab = self._labels(class_labels, labels, n)

        def checked(u, sigma):
            if not bool(torch.isfinite(u).all()):
                raise InputError("x: contains NaN or inf")
            return u.to(self.device), check_sigma(sigma.cpu(), u.shape[0]).to(self.device)

        def forward(u, sigma):
            uu, sg = checked(u, sigma)
            return self._denoised(uu, sg, lab).to(u.device)

        def cov(u, sigma):
            uu, sg = checked(u, sigma)
            return self._posterior_cov(uu, _finite_sigma(sg, "the derivatives of D*"), lab, 1 << 28)

        def diagnose(u, sigma):
            uu, sg = checked(u, sigma)
            return self._diagnose(uu, sg, lab, 1)

        return x, u, (forward, cov, diagnose)


def _finite_sigma(sig: torch.Tensor, what: str) -> torch.Tensor:
    """sig (N,) checked by ``check_sigma``, refused where it is +inf for ``what`` (the
    posterior statistics and covariance, whose bounds need logits 1 / (2 sigma^2) > 0)."""
    if bool((sig == math.inf).any()):
        raise InputError(f"sigma: got inf, but {what} takes finite noise levels only (about 1e-150 < sigma < 1e150); "
                         "at sigma = inf the posterior is uniform over the rows (ESS = M, Cov = the data "
                         "covariance, dD*/dx = 0)")
    return sig
