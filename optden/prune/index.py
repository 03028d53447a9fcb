"""FAISS indexes for certified pruning (docs/design.md, "Pruning"): build, save beside the
dataset, load (rejected when they do not match), and a candidate search whose every
answer carries a rigorous lower bound on the distance of the rows it left out.

Coordinates. The index holds the *centered raw* rows ``q_i = raw_i - center`` in float32
(exact for uint8 data, whose center is integral); queries are centered raw ``v`` (float64,
``v = (u - offset) / scale - center``). Logits are ``-coef ||v - q_i||^2`` with
``coef = scale^2 / (2 sigma^2)``, as in ``optden.engine.precision``.

FAISS computes squared distances in float32, by direct differences or by the expansion
``||x||^2 + ||y||^2 - 2 x.y`` depending on its code path; ``optden.engine.bounds``
(``faiss_distance_interval``) bounds either. So a row FAISS did not return, whose computed
distance is at least the last returned one ``D_K``, has exact distance (to the float32
query, from its float32 copy) at least ``sqrt(D_K - E)``; the roundings of query and row to
float32 are added by the triangle inequality (``bounds.float32_shift``).

IVF lists carry exact float64 radii: every member of list ``l`` lies within ``r_l`` of its
centroid ``c_l`` (float64 copy of FAISS's centroid, radius measured in float64 and widened
by a relative margin), so ``||v - q|| >= ||v - c_l|| - r_l`` for every member.

Everything left out is described by *shells*: ``(count, lower)`` pairs per query, meaning
``count`` rows at exact distance >= ``lower`` from the query. ``optden.prune.cache``
shifts shells by the distance a query moved (triangle inequality); ``optden.prune.pruner``
turns candidates and shells into certified evaluations.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..engine.bounds import DISTANCE_MARGIN, U32, U_TF32_IN, faiss_distance_interval, float32_shift, gamma
from ..errors import DatasetError, DatasetNotFoundError, DtypeError, InputError
from ..fileio import atomic_write, foreign_write_error, remove_stale_temporaries

__all__ = ["PruneIndex", "Candidates", "index_paths", "KINDS", "faiss_gpu_available", "faiss_module", "move_to_shell",
           "save_dir"]

KINDS = ("flat", "ivf")
INDEX_FORMAT = "optden.index"
INDEX_VERSION = 2  # 2: "dataset_sha256" is Dataset.fingerprint (version 1 hashed the raw rows only)


def faiss_module():
    """The faiss module; DatasetError naming the package to install when it is missing."""
    try:
        import faiss
    except ImportError as e:  # faiss-cpu is a dependency; say how to get it anyway
        raise DatasetError("prune: FAISS is not installed (pip install faiss-cpu, or faiss-gpu)") from e
    return faiss


def faiss_gpu_available() -> bool:
    """True when faiss-gpu is installed and sees at least one GPU (no CUDA call otherwise)."""
    faiss = faiss_module()
    return hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0


def index_paths(dir, kind: str) -> tuple[Path, Path]:
    """(FAISS file, JSON metadata) of an index of ``kind`` in dataset directory ``dir``."""
    dir = Path(dir)
    return dir / f"index_{kind}.faiss", dir / f"index_{kind}.json"


def save_dir(dataset, dir) -> Path:
    """Where an index of ``dataset`` is saved: ``dir``, else the dataset's directory
    (InputError when it has none, DatasetNotFoundError when it is not a directory)."""
    if dir is None:
        dir = getattr(dataset, "path", None)
        if dir is None:
            raise InputError("dir: the dataset has no directory (save it first, or pass dir)")
    dir = Path(dir)
    if not dir.is_dir():
        raise DatasetNotFoundError(f"dir: {dir} is not a directory")
    return dir


def _check_kind(kind) -> str:
    if kind not in KINDS:
        raise InputError(f"kind: expected one of {KINDS}, got {kind!r}")
    return kind


def _centered_f32(dataset, a: int, b: int) -> np.ndarray:
    """Centered raw rows a:b as float32 (b - a, d), C-contiguous."""
    block = dataset.raw_block(a, b).to(torch.float64).numpy()
    return np.ascontiguousarray(block - np.asarray(dataset.center), dtype=np.float32)


def _group_shells(counts: np.ndarray, lower: np.ndarray, groups: int = 16):
    """Merge (N, L) shells into at most ``groups`` per query: sorted by lower bound, each
    group keeps its summed count and its smallest lower bound (still a valid bound)."""
    n, L = counts.shape
    if L <= groups:
        return counts, lower
    order = np.argsort(lower, axis=1, kind="stable")
    lo = np.take_along_axis(lower, order, 1)
    ct = np.take_along_axis(counts, order, 1)
    starts = np.linspace(0, L, groups + 1).astype(int)[:-1]
    return np.add.reduceat(ct, starts, axis=1), lo[:, starts]


@dataclass
class Candidates:
    """A certified candidate set per query (torch, on the query device).

    idx:    (N, K) int64 local row positions, -1 where a query has fewer candidates.
    counts: (N, S) float64 rows per shell of left-out rows.
    lower:  (N, S) float64 exact lower bound on their distance (centered raw units)
            from the query the search ran for.
    cand_lower / cand_upper: (N, K) float64 exact bounds on each candidate's distance
            (from FAISS's float32 distance and its error bound; inf where idx is -1).
    """

    idx: torch.Tensor
    counts: torch.Tensor
    lower: torch.Tensor
    cand_lower: torch.Tensor = None
    cand_upper: torch.Tensor = None

    def truncate(self, coef: torch.Tensor, slack: float) -> "Candidates":
        """Drop candidates that provably carry negligible weight before any exact re-score.

        A candidate whose distance lower bound satisfies ``coef (low^2 - up_1^2) > slack``
        (``up_1`` = the smallest candidate upper bound, >= the nearest row's distance)
        moves to a new shell (count, smallest such lower bound). coef: (N,)."""
        valid = self.idx >= 0
        up1 = torch.where(valid, self.cand_upper, torch.full_like(self.cand_upper, torch.inf)).min(1).values
        need = valid & (coef[:, None] * (self.cand_lower**2 - up1[:, None] ** 2) <= slack)
        drop = valid & ~need
        low = torch.where(drop, self.cand_lower, torch.full_like(self.cand_lower, torch.inf)).min(1).values
        return Candidates(*move_to_shell(self.idx, need, self.counts, self.lower, low))


def move_to_shell(idx: torch.Tensor, keep: torch.Tensor, counts: torch.Tensor, lower: torch.Tensor,
                  low: torch.Tensor):
    """Move the candidates outside ``keep`` into one new shell of left-out rows.

    idx: (N, K) candidates (-1 = none); keep: (N, K) bool; counts / lower: (N, S) shells;
    low: (N,) an exact lower bound on the distance of every candidate moved. Returns
    ``(idx (N, K'), counts (N, S + 1), lower (N, S + 1))``, the kept candidates first
    (order kept) and K' the most any query kept (at least 1).
    """
    drop = (idx >= 0) & ~keep
    counts = torch.cat([counts, drop.sum(1, keepdim=True).to(torch.float64)], dim=1)
    lower = torch.cat([lower, low[:, None]], dim=1)
    kept = torch.where(keep, idx, torch.full_like(idx, -1))
    order = (kept < 0).to(torch.int8).argsort(dim=1, stable=True)
    kept = kept.gather(1, order)
    width = max(1, int((kept >= 0).sum(1).max()))
    return kept[:, :width], counts, lower


class PruneIndex:
    """A FAISS index over a Dataset's centered raw rows (all rows; labels are not indexed).

    kind: "flat" (exact exhaustive search, ``IndexFlatL2``) or "ivf" (``IndexIVFFlat``
    with ``nlist`` lists and exact float64 per-list radii for the cluster bounds).
    Build with :meth:`build`, persist with :meth:`save`, reopen with :meth:`load`.
    """

    def __init__(self, dataset, kind: str, index, fingerprint: str, radii=None, centroids=None):
        self.dataset = dataset
        self.kind = _check_kind(kind)
        self.index = index
        self.fingerprint = fingerprint
        self.M, self.d = dataset.M, dataset.d
        self.max_cnorm = float(np.sqrt(np.asarray(dataset.centered_sqnorms).max()))
        self.radii = None if radii is None else np.asarray(radii, dtype=np.float64)
        self.centroids = None if centroids is None else np.asarray(centroids, dtype=np.float64)
        self.list_sizes = None
        self._gpu_index = None
        self.direct = False
        if kind == "ivf":
            inv = index.invlists
            self.list_sizes = np.array([inv.list_size(l) for l in range(index.nlist)], dtype=np.float64)
            self.direct = self._probe_direct()
        self.searches = 0  # FAISS searches run (one per batched call)

    def __repr__(self) -> str:
        extra = f", nlist={self.index.nlist}" if self.kind == "ivf" else ""
        return f"PruneIndex(kind={self.kind!r}, M={self.M}, d={self.d}{extra})"

    @property
    def nlist(self) -> int:
        return int(self.index.nlist) if self.kind == "ivf" else 1

    def _probe_direct(self, n: int = 8) -> bool:
        """Check that this FAISS build scans IVF lists by direct differences (fvec_L2sqr).

        Queries a hair away from the rows of largest norm: there the expansion's float32
        error (~u ||q||^2) would exceed the direct-difference bound gamma_{d+2} d^2 by
        orders of magnitude. True when every returned distance meets the direct bound;
        otherwise the searches use the (looser) expansion bound.
        """
        cs = np.asarray(self.dataset.centered_sqnorms)
        rows = np.argsort(cs)[-min(n, self.M):]
        q = self.dataset.raw_rows(rows).to(torch.float64).numpy() - np.asarray(self.dataset.center)
        q32 = q.astype(np.float32)
        e = np.random.default_rng(0).standard_normal(q32.shape).astype(np.float32) * np.float32(0.01)
        x32 = np.ascontiguousarray(q32 + e)
        self.index.nprobe = self.nlist
        D, I = self.index.search_preassigned(x32, 1, np.tile(np.arange(self.nlist), (len(rows), 1)), None)
        exact = ((x32.astype(np.float64)[:, None, :] - q32.astype(np.float64)[None]) ** 2).sum(-1)
        mine = exact[np.arange(len(rows)), np.arange(len(rows))]
        if (I[:, 0] < 0).any():
            return False
        ref = ((x32.astype(np.float64) - self.dataset.raw_rows(I[:, 0]).to(torch.float64).numpy()
                + np.asarray(self.dataset.center)) ** 2).sum(1)
        g = gamma(self.d + 2, U32)
        return bool((np.abs(D[:, 0] - ref) <= 2 * g * ref + 1e-30).all() and (ref <= mine * (1 + 1e-6)).all())

    # ------------------------------------------------------------------ build
    @classmethod
    def build(cls, dataset, kind: str = "flat", nlist: int | None = None, niter: int = 10, seed: int = 0,
              train_rows: int | None = None) -> "PruneIndex":
        """Build an index of ``kind`` over every row of ``dataset``.

        nlist: IVF lists (default ``4 sqrt(M)``, at most M); niter: k-means iterations;
        train_rows: rows sampled for k-means (default ``min(M, 64 nlist)``).
        """
        if dataset is None or not hasattr(dataset, "raw_block"):
            raise DtypeError(f"dataset: expected an optden.Dataset, got {type(dataset).__name__}")
        kind = _check_kind(kind)
        faiss = faiss_module()
        M, d = dataset.M, dataset.d
        step = max(1, (64 << 20) // (4 * d))
        if kind == "flat":
            index = faiss.IndexFlatL2(d)
            for a in range(0, M, step):
                index.add(_centered_f32(dataset, a, min(M, a + step)))
            return cls(dataset, kind, index, dataset.fingerprint)
        if nlist is None:
            nlist = max(1, min(M, int(round(4 * math.sqrt(M)))))
        if isinstance(nlist, bool) or not isinstance(nlist, (int, np.integer)) or not 1 <= nlist <= M:
            raise InputError(f"nlist: expected an integer in 1..{M} (the number of rows), got {nlist!r}")
        if isinstance(niter, bool) or not isinstance(niter, (int, np.integer)) or niter < 1:
            raise InputError(f"niter: expected a positive integer, got {niter!r}")
        nlist = int(nlist)
        n_train = min(M, 64 * nlist) if train_rows is None else int(train_rows)
        if not nlist <= n_train <= M:
            raise InputError(f"train_rows: expected {nlist}..{M}, got {train_rows!r}")
        rng = np.random.default_rng(seed)
        sel = np.sort(rng.choice(M, size=n_train, replace=False))
        train = np.ascontiguousarray(
            dataset.raw_rows(sel).to(torch.float64).numpy() - np.asarray(dataset.center), dtype=np.float32
        )
        km = faiss.Kmeans(d, nlist, niter=niter, seed=int(seed), verbose=False, min_points_per_centroid=1)
        km.train(train)
        quantizer = faiss.IndexFlatL2(d)
        quantizer.add(km.centroids)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_L2)
        quantizer.this.disown()  # the index owns (and frees) its quantizer
        index.own_fields = True
        index.is_trained = True
        for a in range(0, M, step):
            index.add(_centered_f32(dataset, a, min(M, a + step)))
        centroids = quantizer.reconstruct_n(0, nlist).astype(np.float64)
        radii = cls._radii(dataset, index, centroids)
        return cls(dataset, kind, index, dataset.fingerprint, radii=radii, centroids=centroids)

    @staticmethod
    def _radii(dataset, index, centroids: np.ndarray) -> np.ndarray:
        """Exact float64 max distance of each list's members to its centroid, widened by DISTANCE_MARGIN."""
        faiss = faiss_module()
        inv = index.invlists
        assign = np.full(dataset.M, -1, dtype=np.int64)
        for l in range(index.nlist):
            n = inv.list_size(l)
            if n:
                ids = faiss.rev_swig_ptr(inv.get_ids(l), n).copy()
                assign[ids] = l
        if (assign < 0).any():
            raise DatasetError("prune: the IVF index does not hold every row of the dataset")
        radii = np.zeros(index.nlist, dtype=np.float64)
        center = np.asarray(dataset.center)
        step = max(1, (32 << 20) // (8 * dataset.d))
        for a in range(0, dataset.M, step):
            b = min(dataset.M, a + step)
            q = dataset.raw_block(a, b).to(torch.float64).numpy() - center
            dist = np.sqrt(((q - centroids[assign[a:b]]) ** 2).sum(1))
            np.maximum.at(radii, assign[a:b], dist)
        return radii * (1.0 + DISTANCE_MARGIN) + DISTANCE_MARGIN

    # ------------------------------------------------------------------ persistence
    def save(self, dir=None) -> Path:
        """Write ``index_<kind>.faiss`` and ``index_<kind>.json`` into ``dir`` (default: the
        dataset's directory). The JSON (written last) records the dataset's fingerprint."""
        faiss = faiss_module()
        dir = save_dir(self.dataset, dir)
        fpath, jpath = index_paths(dir, self.kind)
        tmp = fpath.with_name(fpath.name + f".tmp-{os.getpid()}")
        jpath.unlink(missing_ok=True)
        remove_stale_temporaries(dir, f"{fpath.name}.tmp-*")  # what a killed save left
        try:
            faiss.write_index(self.index, str(tmp))
        except RuntimeError as e:  # FAISS reports a full disk in its message only
            tmp.unlink(missing_ok=True)
            raise foreign_write_error(e, fpath, 4 * self.M * self.d) from None
        os.replace(tmp, fpath)
        h = hashlib.sha256(fpath.read_bytes()).hexdigest()
        meta = {
            "format": INDEX_FORMAT,
            "version": INDEX_VERSION,
            "kind": self.kind,
            "M": self.M,
            "d": self.d,
            "dtype": self.dataset.dtype,
            "dataset_sha256": self.fingerprint,
            "index_sha256": h,
            "faiss_version": getattr(faiss, "__version__", "?"),
        }
        if self.kind == "ivf":
            meta["nlist"] = self.nlist
            meta["radii"] = [float(r) for r in self.radii]
            meta["centroids_sha256"] = hashlib.sha256(self.centroids.tobytes()).hexdigest()
        atomic_write(jpath, lambda f: f.write(json.dumps(meta).encode()))
        return dir

    @classmethod
    def exists(cls, dataset, kind: str) -> bool:
        dir = getattr(dataset, "path", None)
        return dir is not None and all(p.is_file() for p in index_paths(dir, kind))

    @classmethod
    def load(cls, dataset, kind: str = "flat", dir=None) -> "PruneIndex":
        """Open the index of ``kind`` saved beside ``dataset`` (or in ``dir``).

        Raises DatasetNotFoundError when it is missing and DatasetError when it is corrupt
        or was built for other data (shape, dtype or the rows' sha256 differ).
        """
        faiss = faiss_module()
        kind = _check_kind(kind)
        if dir is None:
            dir = getattr(dataset, "path", None)
            if dir is None:
                raise DatasetNotFoundError("dir: the dataset has no directory, so it has no saved index")
        fpath, jpath = index_paths(dir, kind)
        if not fpath.is_file() or not jpath.is_file():
            raise DatasetNotFoundError(f"dir: {dir} has no {kind} index ({fpath.name} + {jpath.name}); "
                                       f"build one with `optden index {dir} --kind {kind}`")
        try:
            meta = json.loads(jpath.read_text())
            M, d, dtype, fp = int(meta["M"]), int(meta["d"]), meta["dtype"], meta["dataset_sha256"]
            version = int(meta["version"])
            if meta.get("format") != INDEX_FORMAT or version > INDEX_VERSION or meta["kind"] != kind:
                raise ValueError(f"format {meta.get('format')!r} version {meta.get('version')} kind {meta.get('kind')!r}")
        except (ValueError, KeyError, TypeError) as e:
            raise DatasetError(f"{jpath}: malformed index metadata ({e})") from None
        if version < INDEX_VERSION:
            raise DatasetError(f"{jpath}: the index was made by an older optden (format version {version}); "
                               f"rebuild it with `optden index {dir} --kind {kind}`")
        if (M, d, dtype) != (dataset.M, dataset.d, dataset.dtype):
            raise DatasetError(f"{jpath}: the index was built for ({M}, {d}) {dtype} rows, but the dataset has "
                               f"({dataset.M}, {dataset.d}) {dataset.dtype}; rebuild it with `optden index`")
        if fp != dataset.fingerprint:
            raise DatasetError(f"{jpath}: the index was built for other data (the rows' sha256 differs); "
                               f"rebuild it with `optden index`")
        if hashlib.sha256(fpath.read_bytes()).hexdigest() != meta.get("index_sha256"):
            raise DatasetError(f"{fpath}: sha256 differs from the one in {jpath.name}; the index file is corrupt")
        index = faiss.read_index(str(fpath))
        if index.ntotal != M or index.d != d:
            raise DatasetError(f"{fpath}: holds {index.ntotal} vectors of dimension {index.d}, expected ({M}, {d})")
        if kind == "flat":
            return cls(dataset, kind, index, fp)
        ivf = index  # read_index returns the downcast, owning proxy (a second proxy would dangle)
        if not hasattr(ivf, "nlist") or not hasattr(ivf, "search_preassigned"):
            raise DatasetError(f"{fpath}: is not an IVF index")
        centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist).astype(np.float64)
        radii = np.asarray(meta.get("radii", []), dtype=np.float64)
        if radii.shape != (ivf.nlist,) or hashlib.sha256(centroids.tobytes()).hexdigest() != meta.get("centroids_sha256"):
            raise DatasetError(f"{jpath}: radii / centroids do not match {fpath.name}")
        return cls(dataset, kind, ivf, fp, radii=radii, centroids=centroids)

    # ------------------------------------------------------------------ search
    def _flat_for(self, device: torch.device):
        """The flat index on a GPU when faiss-gpu sees one and the queries live on CUDA."""
        if self.kind != "flat" or device.type != "cuda" or not faiss_gpu_available():
            return self.index, 0.0
        if self._gpu_index is None:
            faiss = faiss_module()
            self._res = faiss.StandardGpuResources()
            self._gpu_index = faiss.index_cpu_to_gpu(self._res, device.index or 0, self.index)
        return self._gpu_index, U_TF32_IN

    def _lower_from_faiss(self, dk: np.ndarray, x32: np.ndarray, shift: np.ndarray, u_in: float,
                          direct: bool = False) -> np.ndarray:
        """Exact lower bound (N,) on the distance from v of rows whose float32 squared
        distance FAISS computed as >= dk (N,); shift = ||v - v32|| + ||q - q32|| bound.
        direct: FAISS computed by direct differences (error <= gamma_{d+2} d^2, relative)
        rather than by the expansion (error <= 2 gamma_{d+4} (||x|| + ||q||)^2)."""
        low, _ = self._faiss_interval(dk, x32, shift, u_in, direct)
        return low

    def _faiss_interval(self, D: np.ndarray, x32: np.ndarray, shift: np.ndarray, u_in: float, direct: bool):
        """Exact (lower, upper) bounds on the distances from v whose float32 squared values
        FAISS computed as D (N,) or (N, K) (``bounds.faiss_distance_interval``)."""
        return faiss_distance_interval(D, x32, shift, d=self.d, max_cnorm=self.max_cnorm, u_in=u_in, direct=direct)

    def centroid_lower(self, v: torch.Tensor) -> torch.Tensor:
        """IVF cluster bounds: (N, nlist) exact lower bound on the distance from v (N, d) to
        any member of each list, ``max(0, ||v - c_l|| - r_l)`` (float64)."""
        c = torch.from_numpy(self.centroids).to(v.device)
        r = torch.from_numpy(self.radii).to(v.device)
        # direct differences (no expansion): float64 error ~ d * 1e-16 relative, inside DISTANCE_MARGIN
        dist = torch.cdist(v, c, compute_mode="donot_use_mm_for_euclid_dist")
        return torch.clamp(dist * (1.0 - DISTANCE_MARGIN) - r, min=0.0)

    def search(self, v: torch.Tensor, k: int, probes: torch.Tensor | None = None) -> Candidates:
        """The k nearest rows by FAISS and a rigorous bound on every other row.

        v: (N, d) float64 centered raw queries (torch, any device). probes: IVF only, (N, P)
        int64 list numbers to search (-1 padded); the other lists become one shell each
        (their cluster bound). Returns ``Candidates`` on v's device.
        """
        dev = v.device
        n = v.shape[0]
        k = max(1, min(int(k), self.M))
        x32 = v.detach().to("cpu", torch.float32).numpy()
        x32 = np.ascontiguousarray(x32)
        resid = torch.linalg.vector_norm(v.cpu() - torch.from_numpy(x32).to(torch.float64), dim=1).numpy()
        shift = float32_shift(resid, self.max_cnorm)
        self.searches += 1
        if self.kind == "flat":
            index, u_in = self._flat_for(dev)
            D, I = index.search(x32, k)
            direct = False
            low = self._lower_from_faiss(D[:, -1], x32, shift, u_in) if k < self.M else np.full(n, np.inf)
            counts = np.full((n, 1), float(self.M - k))
            lower = low[:, None]
        else:
            if probes is None:
                raise InputError("probes: required for an IVF index")
            pr = probes.detach().cpu().numpy().astype(np.int64)
            self.index.nprobe = int(pr.shape[1])
            D, I = self.index.search_preassigned(x32, k, pr, None)
            u_in, direct = 0.0, self.direct
            probed = np.zeros((n, self.nlist), dtype=bool)
            rows = np.repeat(np.arange(n), pr.shape[1])
            ok = pr.reshape(-1) >= 0
            probed[rows[ok], pr.reshape(-1)[ok]] = True
            in_probed = (probed * self.list_sizes[None, :]).sum(1)
            returned = (I >= 0).sum(1)
            rest = in_probed - returned
            # rows of probed lists that were not returned: FAISS distance >= the k-th
            low = self._lower_from_faiss(D[:, -1], x32, shift, 0.0, direct=self.direct)
            low = np.where(rest > 0, low, np.inf)
            clow = self.centroid_lower(v.detach().cpu().to(torch.float64)).numpy()
            cnt, lw = _group_shells(np.where(probed, 0.0, self.list_sizes[None, :]), np.where(probed, np.inf, clow))
            counts = np.concatenate([rest[:, None], cnt], axis=1)
            lower = np.concatenate([low[:, None], lw], axis=1)
        clow, cup = self._faiss_interval(D, x32, shift, u_in, direct)
        return Candidates(
            idx=torch.from_numpy(I.astype(np.int64)).to(dev),
            cand_lower=torch.from_numpy(clow).to(dev),
            cand_upper=torch.from_numpy(cup).to(dev),
            counts=torch.from_numpy(np.asarray(counts, dtype=np.float64)).to(dev),
            lower=torch.from_numpy(np.asarray(lower, dtype=np.float64)).to(dev),
        )
