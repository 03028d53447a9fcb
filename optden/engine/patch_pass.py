"""The local denoisers' passes: every output position at once, by box sums, into one Partial.

For a query image v and a training image q (both (C, H, W), raw values minus one scalar
center), the squared differences ``e = sum_c (v - q)^2`` are one (H, W) map, and a k x k
box sum of it gives the patch distance ``||v[Omega_p] - q[Omega_p]||^2`` at every position
p at once: O(C H W) per image pair instead of O(C H W k^2) (issue 21's hint). Everything
is float64 direct differences, so each logit is within a relative gamma of the truth
(``bounds.direct_pass_delta``): the pass certifies DENSE almost everywhere; the queries it
cannot certify go to ``certify_queries`` (the engine's ``certify`` over a ``PatchSource``).

Queries of a pass are (position, image) pairs, position-major: query ``p * n + b`` is
position p of query image b, so a ``Partial`` over N = HW n queries holds one online softmax
per output position, folded with ``Partial.absorb_grouped`` (the rows a position weighs are
its own pixels).

Kinds (``optden.local``):

* "local" (LS): each position against the same position of every image; values: the
  center pixel (C values).
* "equivariant" (ELS): against every position q of the same class
  (``PatchGeometry.classes``) of every image: the training images shifted by t = q - p
  (``torch.roll``), one box sum per shift; values: the center pixel of the row's window.
* the composite runs the LS pass without values (its log-sum-exp per position), then
  ``composite_pass``: the normalised weights, box-summed over the windows that cover each
  pixel, weigh the pixels.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .bounds import direct_pass_delta
from .partial import Partial
from .patches import PatchGeometry, PatchSource
from .precision import DENSE, certify

__all__ = ["box_sum", "shifts", "competitors", "local_partial", "composite_pass", "query_patches", "certify_queries"]

#: Float64 working set of one block of a pass (the (n, B, C, H, W) difference tensor): on
#: CPU, a few of them stay in the last-level cache; on a GPU, larger blocks mean fewer launches.
BLOCK_BYTES = {"cpu": 1 << 26, "cuda": 1 << 30}


def box_sum(e: torch.Tensor, k: int, padding: str) -> torch.Tensor:
    """k x k box sums of maps e (..., H, W): out[..., y, x] = sum of e over the window centred
    at (y, x), wrapped ("circular") or cut at the border ("zero"). Explicit additions of the
    k shifted slices per axis (no running sums: the terms are nonnegative, and a sum of them
    in any order keeps a relative error bound; a running sum's subtractions would not)."""
    r = k // 2
    if r == 0:
        return e.clone()
    H, W = e.shape[-2:]
    if padding == "circular":
        ep = torch.cat([e[..., -r:], e, e[..., :r]], dim=-1)
    else:
        ep = F.pad(e, (r, r))
    h = ep[..., 0:W].clone()
    for j in range(1, k):
        h += ep[..., j : j + W]
    if padding == "circular":
        hp = torch.cat([h[..., -r:, :], h, h[..., :r, :]], dim=-2)
    else:
        hp = F.pad(h, (0, 0, r, r))
    out = hp[..., 0:H, :].clone()
    for j in range(1, k):
        out += hp[..., j : j + H, :]
    return out


def shifts(geom: PatchGeometry, kind: str, device) -> list:
    """The shifts t = (ty, tx) a pass runs the rows at, each with ``(q (HW,) int64 the row
    position q = p + t of each output position p, allowed (HW,) bool or None for all)``.
    "local": t = 0 only; "equivariant": every t with at least one allowed position, t = 0
    first (it is allowed everywhere, which gives every query a finite first logit)."""
    H, W, HW = geom.H, geom.W, geom.HW
    py, px = np.divmod(np.arange(HW), W)
    out = []
    if kind == "local":
        return [((0, 0), torch.arange(HW, device=device), None)]
    cls = geom.classes
    rng_y = range(H) if geom.padding == "circular" else range(-(H - 1), H)
    rng_x = range(W) if geom.padding == "circular" else range(-(W - 1), W)
    order = sorted(((ty, tx) for ty in rng_y for tx in rng_x), key=lambda t: t != (0, 0))
    for ty, tx in order:
        qy, qx = py + ty, px + tx
        if geom.padding == "circular":
            q = (qy % H) * W + (qx % W)
            out.append(((ty, tx), torch.from_numpy(q).to(device), None))
            continue
        inside = (qy >= 0) & (qy < H) & (qx >= 0) & (qx < W)
        q = np.where(inside, qy * W + qx, 0)
        allowed = inside & (cls[q] == cls)
        if allowed.any():
            out.append(((ty, tx), torch.from_numpy(q).to(device), torch.from_numpy(allowed).to(device)))
    return out


def _rows_per_block(n: int, geom: PatchGeometry, device: torch.device) -> int:
    budget = BLOCK_BYTES.get(device.type, BLOCK_BYTES["cpu"])
    return max(1, budget // max(1, 8 * n * geom.C * geom.HW * 2))


def _image_blocks(rows, c0: float, n: int, geom: PatchGeometry):
    """(global image indices (B,), centered float64 images (B, C, H, W)) over a RowSource."""
    step = _rows_per_block(n, geom, torch.device(rows.device))
    for off, raw, _ in rows.blocks(rows=step):
        gi = rows.global_index(torch.arange(off, off + raw.shape[0], device=raw.device))
        yield gi, (raw.to(torch.float64) - c0).reshape(raw.shape[0], *geom.image_shape)


def _logits(v: torch.Tensor, coef: torch.Tensor, yt: torch.Tensor, geom: PatchGeometry) -> torch.Tensor:
    """(n, B, HW) logits -coef ||v[Omega_p] - yt[Omega_p]||^2 of queries v (n, C, H, W)
    against rows yt (B, C, H, W), all positions p."""
    e = (v[:, None] - yt[None]).square_().sum(2)  # (n, B, H, W)
    d = box_sum(e, geom.k, geom.padding)
    return d.mul_(-coef[:, None, None, None]).reshape(v.shape[0], yt.shape[0], geom.HW)


def local_partial(v: torch.Tensor, coef: torch.Tensor, rows, geom: PatchGeometry, c0: float, kind: str,
                  values: bool = True) -> Partial:
    """The certified-ready pass of LS ("local") or ELS ("equivariant") over a RowSource of images.

    v: (n, C, H, W) float64 queries in raw units minus the scalar center c0, on rows.device;
    coef: (n,) the logits' 1 / (2 sigma^2) in raw units. Returns a Partial over the HW n
    (position, image) queries, position-major, with acc the weighted center pixels (C
    values, centered; no values when ``values`` is False), the top logit and its data set
    patch index (``row * HW + q``), and delta (``bounds.direct_pass_delta``).
    """
    n, HW, C = v.shape[0], geom.HW, geom.C
    part = Partial.empty(HW * n, C if values else 0, 1, v.device)
    plan = shifts(geom, kind, v.device)
    for gi, y in _image_blocks(rows, c0, n, geom):
        B = y.shape[0]
        for (ty, tx), q, allowed in plan:
            yt = y if (ty, tx) == (0, 0) else torch.roll(y, shifts=(-ty, -tx), dims=(2, 3))
            lg = _logits(v, coef, yt, geom).permute(2, 0, 1)  # (HW, n, B)
            if allowed is not None:
                lg = lg.masked_fill(~allowed[:, None, None], -math.inf)
            vals = yt.reshape(B, C, HW).permute(2, 0, 1) if values else yt.new_zeros(HW, B, 0)
            index = gi[None, :] * HW + q[:, None]  # (HW, B)
            part.absorb_grouped(lg.contiguous(), vals.contiguous(), index)
    competing = rows.M * competitors(geom, kind)
    part.delta = direct_pass_delta(geom.d, part.m, competing)
    return part


def competitors(geom: PatchGeometry, kind: str) -> int:
    """The most positions one output position competes over (1 for LS)."""
    if kind == "local":
        return 1
    return int(np.bincount(geom.classes).max())


def composite_pass(v: torch.Tensor, coef: torch.Tensor, rows, geom: PatchGeometry, c0: float,
                   lse: torch.Tensor) -> torch.Tensor:
    """The composite's second pass: sum over the windows p covering each pixel of the LS
    posterior's patch mean there, ``sum_p sum_i exp(l_i(p) - lse_p) y_i[pixel]``.

    lse: (HW n,) position-major log-sum-exp of the LS logits (``local_partial`` without
    values); +inf leaves a position out (its weights are 0). Returns (n, C, H, W) float64
    centered sums; divide by ``geom.covers`` for the composite.
    """
    n = v.shape[0]
    acc = torch.zeros_like(v)
    ls = lse.reshape(geom.HW, n).T.reshape(n, 1, geom.H, geom.W)
    for _, y in _image_blocks(rows, c0, n, geom):
        lg = _logits(v, coef, y, geom).reshape(n, y.shape[0], geom.H, geom.W)
        w = torch.exp(lg - ls)
        wsum = box_sum(w, geom.k, geom.padding)  # the windows covering each pixel
        acc += torch.einsum("nbhw,bchw->nchw", wsum, y)
    return acc


def query_patches(v: torch.Tensor, geom: PatchGeometry, positions: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """The windows (m, C k^2) of centered query images v (n, C, H, W) at positions (m,) of
    images (m,) (out-of-image values 0, the centered pad)."""
    flat = torch.cat([v.reshape(v.shape[0], -1), v.new_zeros(v.shape[0], 1)], dim=1)
    cols = torch.from_numpy(np.where(geom.columns >= 0, geom.columns, geom.C * geom.HW)).to(v.device)
    return flat.index_select(0, images).gather(1, cols.index_select(0, positions))


def certify_queries(todo: torch.Tensor, v: torch.Tensor, coef: torch.Tensor, rows, geom: PatchGeometry,
                    kind: str, tol: float, values: str, backend):
    """Certify the queries ``todo`` (indices into a pass's position-major queries) that the
    fast pass could not: group them by the rows they compete with (LS and the
    composite: one position; ELS: one class of positions), run the engine's ``backend``
    pass (top 64) over a ``PatchSource`` of those rows and ``certify`` it.

    values: "center" (the window's center pixel, (C,)) or "patch" (the whole window, (C k^2,)).
    Returns ``(values (m, C or C k^2) centered, bound (m,), mode (m,) int8)`` in the order of todo.
    """
    n = v.shape[0]
    pos, img = torch.div(todo, n, rounding_mode="floor"), todo % n
    key = pos if kind == "local" else torch.from_numpy(geom.classes).to(todo.device)[pos]
    width = geom.C if values == "center" else geom.d
    out = torch.full((todo.numel(), width), math.nan, dtype=torch.float64, device=v.device)
    bound = torch.full((todo.numel(),), math.nan, dtype=torch.float64, device=v.device)
    mode = torch.full((todo.numel(),), DENSE, dtype=torch.int8, device=v.device)
    cols = torch.from_numpy(geom.center_columns).to(v.device)
    for kv in key.unique().tolist():
        sel = (key == kv).nonzero().flatten()
        members = np.array([kv]) if kind == "local" else np.flatnonzero(geom.classes == kv)
        src = PatchSource(rows, geom, members)
        vq = query_patches(v, geom, pos[sel], img[sel])
        cq = coef[img[sel]]
        kk = min(64, src.M)
        cert = certify(backend.partial(vq, cq, src, kk), vq, cq, src, tol)
        out[sel] = cert.dc[:, cols] if values == "center" else cert.dc
        # certify re-scores with float64 direct differences and counts them exact; they are
        # within the relative bound of this module's passes (|l| <= |lse| + log M)
        top = cert.lse.abs() + math.log(src.M)
        rounding = torch.expm1(2.0 * direct_pass_delta(geom.d, top, src.M))
        bound[sel] = torch.where(cert.mode == DENSE, cert.excluded, cert.excluded + rounding)
        mode[sel] = cert.mode
    return out, bound, mode
