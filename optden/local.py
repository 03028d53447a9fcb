"""LocalDenoiser: the exact, certified local denoisers of a data set of images.

Trained diffusion models generalize; the field explains what they compute with
closed-form denoisers under locality and equivariance (issue 21): softmax-weighted
empirical denoisers over patches. For images (C, H, W) and an odd patch size k
(docs/design.md, "The math"; the oracles in ``optden.reference.local``):

* ``kind="local"`` (LS, Kamb & Ganguli 2025): each output pixel p is the posterior mean of
  the pixel p of the training images, weighted by how close their k x k windows at p are
  to the query's: ``w_i(p) = softmax_i(-||x[Omega_p] - y_i[Omega_p]||^2 / 2 sigma^2)``.
* ``kind="equivariant"`` (ELS): the window at p competes with the windows of every image at
  every position q (of the same in-image shape under zero padding), and the output is the
  weighted mean of their center pixels.
* ``kind="composite"`` (PSPC-square, Niedoba et al. 2025): the LS posterior's whole patch
  mean at every p, averaged over the windows covering each pixel.

``padding="circular"`` wraps windows around the image; ``padding="zero"`` cuts them at the
border and compares in-image pixels only. With k covering the image (k >= 2 max(H, W) - 1)
and zero padding, LS is D* exactly.

Computation (``optden.engine.patch_pass``): float64 direct differences, every position at
once by box sums, the engine's ``Partial`` per position, certified DENSE by
``bounds.direct_pass_delta``; what a pass cannot certify goes to the engine's torch
backend and ``certify`` over the patches (``optden.engine.patches.PatchSource``). The
``cpu`` backend runs the passes in optden._C (csrc/patch_*.cpp).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .denoiser import OptimalDenoiser
from .engine import dispatch
from .engine import patch_pass
from .engine.bounds import accumulation_error, dense_threshold
from .engine.patches import PADDINGS, PatchGeometry, check_patch_size, max_deviation, patch_center
from .engine.precision import DEFAULT_TOL, DENSE, MODE_NAMES
from .errors import DatasetError, DtypeError, InputError

__all__ = ["LocalDenoiser", "LocalEvaluation", "KINDS", "PatchSchedule"]

#: The local denoisers (see the module docstring).
KINDS = ("local", "equivariant", "composite")
#: Backends of the local passes: "cpu" (optden._C, CPU only) and "torch" (float64, any device).
LOCAL_BACKENDS = ("auto", "cpu", "torch")


@dataclass
class LocalEvaluation:
    """One certified evaluation, per query image (float64 unless noted; B queries, (C, H, W) images).

    denoised:   (B, C, H, W) the local denoiser in model space.
    bound:      (B, H, W) certified bound on the relative weight left out or misweighted
                in each position's posterior (composite: the mean over the windows covering
                the pixel).
    error:      (B, H, W) certified bound on ||denoised[:, p] - exact[:, p]|| (model units).
    mode:       (B, H, W) int8: how each position was certified (``MODE_NAMES``: dense,
                rescored, exact).
    patch_size: (B,) int64, the k each query used.
    """

    denoised: torch.Tensor
    bound: torch.Tensor
    error: torch.Tensor
    mode: torch.Tensor
    patch_size: torch.Tensor

    def modes(self) -> dict:
        """{mode name: number of positions}."""
        vals, counts = self.mode.unique(return_counts=True)
        return {MODE_NAMES[int(v)]: int(c) for v, c in zip(vals, counts)}


class PatchSchedule:
    """The patch size as a function of sigma: an int, a callable ``sigma -> k``, or a list of
    sizes aligned with a sampler's ``sigmas`` (a list of positive sigmas, or a
    ``Schedule``: its positive sigmas), where a call at sigma uses the size of the grid sigma
    nearest in log scale (Kamb & Ganguli calibrate one size per noise level; PSPC uses a
    schedule of sizes)."""

    def __init__(self, patch_size, image_hw: tuple, padding: str, sigmas=None):
        self.image_hw, self.padding = tuple(image_hw), padding
        self.grid = None
        if callable(patch_size) and not isinstance(patch_size, (list, tuple)):
            self.fn: Callable | None = patch_size
            self.const = None
            if sigmas is not None:
                raise InputError("sigmas: given with a callable patch_size; it is needed only with a list of sizes")
            return
        self.fn = None
        if isinstance(patch_size, (list, tuple, np.ndarray, torch.Tensor)):
            sizes = [check_patch_size(int(k) if isinstance(k, (np.integer, torch.Tensor)) else k, image_hw, padding,
                                      f"patch_size[{j}]") for j, k in enumerate(list(patch_size))]
            grid = self._grid(sigmas)
            if len(sizes) != grid.numel():
                raise InputError(f"patch_size: {len(sizes)} sizes for the {grid.numel()} positive sigmas of sigmas")
            self.grid, self.sizes, self.const = grid, np.array(sizes, dtype=np.int64), None
            return
        if sigmas is not None:
            raise InputError("sigmas: given with a single patch_size; it is needed only with a list of sizes")
        self.const = check_patch_size(patch_size, image_hw, padding)

    @staticmethod
    def _grid(sigmas) -> torch.Tensor:
        if sigmas is None:
            raise InputError("sigmas: a list of patch sizes needs the sigmas it is aligned with (a sampler's grid)")
        s = sigmas.sigmas if hasattr(sigmas, "sigmas") else sigmas
        try:
            t = torch.as_tensor(s, dtype=torch.float64).reshape(-1)
        except (TypeError, ValueError, RuntimeError):
            raise InputError(f"sigmas: expected a list of positive numbers or a Schedule, got {sigmas!r}") from None
        t = t[t > 0] if hasattr(sigmas, "sigmas") else t
        if t.numel() == 0 or not bool(torch.isfinite(t).all()) or bool((t <= 0).any()):
            raise InputError("sigmas: expected finite positive numbers")
        return t

    def __call__(self, sigma: torch.Tensor) -> np.ndarray:
        """(N,) int64 patch sizes for sigmas (N,)."""
        n = sigma.numel()
        if self.const is not None:
            return np.full(n, self.const, dtype=np.int64)
        if self.grid is not None:
            dist = (torch.log(sigma.cpu())[:, None] - torch.log(self.grid)[None, :]).abs()
            return self.sizes[dist.argmin(1).numpy()]
        out = np.empty(n, dtype=np.int64)
        for s in sigma.unique().tolist():
            k = self.fn(s)
            if isinstance(k, (np.integer, torch.Tensor)):
                k = int(k)
            out[(sigma.cpu() == s).numpy()] = check_patch_size(k, self.image_hw, self.padding,
                                                               f"patch_size({s:g})")
        return out


class LocalDenoiser(OptimalDenoiser):
    """A local denoiser of ``dataset``'s images: LS, ELS or the patch composite (module docstring).

    Args:
        dataset: an ``optden.Dataset`` of images (image_shape (C, H, W)).
        patch_size: odd k, a callable ``sigma -> k``, or a list of sizes aligned with
            ``sigmas`` (``PatchSchedule``).
        kind: "local" (LS), "equivariant" (ELS) or "composite".
        padding: "circular" (windows wrap around) or "zero" (cut at the border).
        device: torch device of the computation.
        backend: "auto" (the compiled "cpu" passes on CPU when optden._C has them, else
            "torch"), "cpu" or "torch" (float64, any device).
        tol: target relative error (default 1e-6; the contract is 1e-5).
        sigmas: the sampler's sigma grid a list of patch sizes is aligned with.

    Called like ``OptimalDenoiser`` (EDM's face): ``den(x, sigma, class_labels=None, *, s=1)``,
    ``den.score``, ``den.denoise_certified`` (a ``LocalEvaluation`` with a bound per
    position), and ``nearest`` (whole training images, for memorization). Samplers, mean
    shift, the ODE-jump and the analyses take it unchanged.
    """

    def __init__(self, dataset, patch_size, kind: str = "local", padding: str = "circular", device="cpu",
                 backend: str = "auto", tol: float = DEFAULT_TOL, sigmas=None, block_rows: int | None = None):
        if dataset is None or not hasattr(dataset, "image_shape"):
            raise DtypeError(f"dataset: expected an optden.Dataset of images, got {type(dataset).__name__}")
        if len(dataset.image_shape) != 3:
            raise DatasetError(f"dataset: a local denoiser needs images (C, H, W); its rows have shape "
                               f"{tuple(dataset.image_shape)} (give image_shape when building the Dataset)")
        if kind not in KINDS:
            raise InputError(f"kind: expected one of {KINDS}, got {kind!r}")
        if padding not in PADDINGS:
            raise InputError(f"padding: expected one of {PADDINGS}, got {padding!r}")
        if backend not in LOCAL_BACKENDS:
            raise InputError(f"backend: expected one of {LOCAL_BACKENDS} for a local denoiser, got {backend!r}")
        super().__init__(dataset, device=device, backend="auto", tol=tol, block_rows=block_rows, prune="off")
        self.kind, self.padding = kind, padding
        self.schedule = PatchSchedule(patch_size, dataset.image_shape[1:], padding, sigmas)
        self.patch_size = patch_size
        self.local_backend = self._pick_local_backend(backend)
        self._geometries: dict = {}

    def _pick_local_backend(self, name: str) -> str:
        from . import _ext

        compiled = _ext.C is not None and hasattr(_ext.C, "patch_pass")
        if name == "cpu":
            if self.device.type != "cpu":
                raise InputError(f"backend: 'cpu' runs on CPU tensors only, not on {self.device}")
            if not compiled:
                raise InputError("backend: 'cpu' needs optden._C with the patch passes (rebuild: pip install "
                                 "--no-build-isolation -e .)")
            return "cpu"
        if name == "auto":
            return "cpu" if compiled and self.device.type == "cpu" else "torch"
        return name

    def __repr__(self) -> str:
        return (f"LocalDenoiser(kind={self.kind!r}, patch_size={self.patch_size!r}, padding={self.padding!r}, "
                f"M={self.M}, image_shape={self.image_shape}, device={self.device}, backend={self.local_backend!r}, "
                f"tol={self.tol:g})")

    def geometry(self, k: int) -> PatchGeometry:
        """The window geometry of patch size k (cached)."""
        if k not in self._geometries:
            self._geometries[k] = PatchGeometry(self.image_shape, k, self.padding)
        return self._geometries[k]

    # ------------------------------------------------------------------ core
    def _denoised(self, u: torch.Tensor, sigma: torch.Tensor, labels=None, u_lo=None) -> torch.Tensor:
        """The local denoiser (N, d) in model space (``evaluate(...).denoised`` flattened)."""
        return self.evaluate(u, sigma, labels).denoised.reshape(u.shape[0], self.d)

    def evaluate(self, u: torch.Tensor, sigma: torch.Tensor, labels=None, k=None, need_top: bool = True,
                 u_lo=None) -> LocalEvaluation:
        """Certified evaluation of validated inputs: u (N, d) float64 model-space queries on
        the device (already divided by s), sigma (N,) float64, labels None or (N,) int64 CPU.
        (``k``, ``need_top`` and ``u_lo``, the residual of x / s, are OptimalDenoiser's and
        unused here: the local passes certify for the float64 u.)"""
        n = u.shape[0]
        C, H, W = self.image_shape
        ks = self.schedule(sigma)
        coef_all = self._coef(sigma)
        nan = dict(dtype=torch.float64, device=self.device)
        out = LocalEvaluation(torch.full((n, C, H, W), math.nan, **nan), torch.full((n, H, W), math.nan, **nan),
                              torch.full((n, H, W), math.nan, **nan), torch.full((n, H, W), -1, dtype=torch.int8),
                              torch.from_numpy(ks.copy()))
        lab = labels.numpy() if labels is not None else np.full(n, -1)
        for key in sorted(set(zip(lab.tolist(), ks.tolist()))):
            qi = torch.from_numpy(np.flatnonzero((lab == key[0]) & (ks == key[1])))
            label = None if key[0] < 0 else int(key[0])
            part = self._evaluate_group(u[qi.to(self.device)], coef_all[qi.to(self.device)], label, key[1])
            for name, val in zip(("denoised", "bound", "error", "mode"), part):
                getattr(out, name)[qi.to(getattr(out, name).device)] = val.to(getattr(out, name).device)
        return out

    def _evaluate_group(self, u: torch.Tensor, coef: torch.Tensor, label, k: int):
        """(denoised (n, C, H, W), bound (n, H, W), error (n, H, W), mode (n, H, W)) of
        queries u (n, d) that share a class label (or None) and a patch size k."""
        ds, geom = self.dataset, self.geometry(k)
        rows = self.source(label)
        c0 = patch_center(ds)
        # |y - D| <= 2 sqrt(C) max|raw - c0| per pixel: what a weight error multiplies
        spread = 2.0 * math.sqrt(geom.C) * max_deviation(ds, c0)
        n, HW = u.shape[0], geom.HW
        v = ((u - ds.offset) / ds.scale - c0).reshape(n, *geom.image_shape)
        passes = self._passes()
        if self.kind == "composite":
            img, bound, mode = self._composite(v, coef, rows, geom, c0, passes)
            competing = rows.M * geom.k * geom.k
        else:
            part = passes.local_partial(v, coef, rows, geom, c0, self.kind)
            dc, bound, mode = self._certified(part, v, coef, rows, geom, self.kind, "center")
            img = (dc.reshape(HW, n, geom.C).permute(1, 2, 0).reshape(n, *geom.image_shape) + c0)
            competing = rows.M * patch_pass.competitors(geom, self.kind)
        err = (bound * spread + accumulation_error(competing, spread)) * ds.scale
        per_pos = lambda t: t.reshape(geom.H, geom.W, n).permute(2, 0, 1)  # noqa: E731
        return img * ds.scale + ds.offset, per_pos(bound), per_pos(err), per_pos(mode)

    def _certified(self, part, v, coef, rows, geom: PatchGeometry, kind: str, values: str):
        """The certified means of a pass's Partial: ``(mean (HW n, width), bound (HW n,),
        mode (HW n,) int8)``; the queries its delta does not certify DENSE are certified by
        the engine's torch backend over their patches (``patch_pass.certify_queries``)."""
        dense = part.delta <= dense_threshold(self.tol)  # False for a NaN bound
        bound = torch.expm1(2.0 * part.delta)
        mode = torch.full(bound.shape, DENSE, dtype=torch.int8, device=bound.device)
        mean = part.mean() if values == "center" else None
        todo = (~dense).nonzero().flatten()
        if todo.numel():
            vals, b, m = patch_pass.certify_queries(todo, v, coef, rows, geom, kind, self.tol, values,
                                                    dispatch.get("torch"))
            bound[todo], mode[todo] = b, m
            if mean is not None:
                mean[todo] = vals
            else:
                mean = (todo, vals)
        return mean, bound, mode

    def _composite(self, v, coef, rows, geom: PatchGeometry, c0: float, passes):
        """(image (n, C, H, W) centered raw, bound (HW n,), mode (HW n,)) of the composite:
        the LS pass without values gives each position's log-sum-exp; the second pass sums
        the normalised weights over the windows covering each pixel; positions the first
        pass cannot certify are certified over their patches and added in."""
        n, HW = v.shape[0], geom.HW
        part = passes.local_partial(v, coef, rows, geom, c0, "local", values=False)
        fixed, bound, mode = self._certified(part, v, coef, rows, geom, "local", "patch")
        lse = part.lse()
        if fixed is not None:
            lse[fixed[0]] = math.inf  # certified over their patches: left out of the second pass
        acc = passes.composite_pass(v, coef, rows, geom, c0, lse)
        if fixed is not None:
            todo, vals = fixed
            pos, img = torch.div(todo, n, rounding_mode="floor"), todo % n
            cols = torch.from_numpy(geom.columns).to(v.device)[pos]  # (m, C k^2)
            inside = cols >= 0
            acc.reshape(n, -1).index_put_((img[:, None].expand_as(cols)[inside], cols[inside]), vals[inside],
                                          accumulate=True)
        covers = torch.from_numpy(geom.covers).to(v.device)
        pix_bound = _sum_over_windows(bound.reshape(HW, n), geom) / covers[:, None]
        pix_mode = _max_over_windows(mode.reshape(HW, n), geom)
        return acc / covers.reshape(1, 1, geom.H, geom.W) + c0, pix_bound.reshape(-1), pix_mode.reshape(-1)

    def _passes(self):
        """The module whose ``local_partial`` and ``composite_pass`` run this denoiser's passes."""
        if self.local_backend == "cpu":
            from .engine import patch_cpu

            return patch_cpu
        return patch_pass

    # ------------------------------------------------------------------ what is not defined here
    # OptimalDenoiser's posterior statistics, covariance and derivatives are those of D*'s
    # single posterior: none of them is a local denoiser's, so each is refused rather than
    # inherited (sample(record=True) then records no diagnostics and calls this denoiser).
    @property
    def diagnostics(self):
        raise AttributeError("diagnostics: a local denoiser has one posterior per output position, not D*'s; "
                             "use OptimalDenoiser.diagnostics")

    def posterior_cov(self, *args, **kwargs):
        raise InputError("posterior_cov: a local denoiser's Jacobian is not a posterior covariance; "
                         "use OptimalDenoiser")

    def _differentiable(self, x, s, class_labels, labels):
        raise InputError("x: a local denoiser is not differentiable in optden (its derivatives are not D*'s "
                         "posterior moments); call it on tensors that do not require grad (x.detach())")

    def log_density(self, *args, **kwargs):
        raise InputError("log_density: a local denoiser has no density (it is a product of local posteriors, "
                         "not a smoothed distribution); use OptimalDenoiser")

    def posterior(self, *args, **kwargs):
        raise InputError("posterior: a local denoiser has one posterior per output position; "
                         "use denoise_certified for its bounds, or OptimalDenoiser for the image posterior")


def _sum_over_windows(per_pos: torch.Tensor, geom: PatchGeometry) -> torch.Tensor:
    """(HW, n) per window -> (HW, n) per pixel: the sum over the windows covering it."""
    pix = torch.from_numpy(geom.pixels).to(per_pos.device)  # (HW, k^2): window p covers pix[p]
    out = torch.zeros_like(per_pos)
    inside = pix >= 0
    p_idx = torch.arange(geom.HW, device=per_pos.device)[:, None].expand_as(pix)[inside]
    out.index_add_(0, pix[inside], per_pos[p_idx])
    return out


def _max_over_windows(per_pos: torch.Tensor, geom: PatchGeometry) -> torch.Tensor:
    """(HW, n) int8 -> (HW, n): the largest value over the windows covering each pixel."""
    pix = torch.from_numpy(geom.pixels).to(per_pos.device)
    inside = pix >= 0
    p_idx = torch.arange(geom.HW, device=per_pos.device)[:, None].expand_as(pix)[inside]
    out = torch.zeros(per_pos.shape, dtype=torch.int64, device=per_pos.device)
    out.scatter_reduce_(0, pix[inside][:, None].expand(-1, per_pos.shape[1]), per_pos[p_idx].to(torch.int64),
                        reduce="amax")
    return out.to(torch.int8)
