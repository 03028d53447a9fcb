"""Float64 oracles of the local denoisers: LS, ELS and the patch composite.

Plain loops over output positions, for small images (tests, checks); nothing is blocked,
boxed or pruned. Images are (C, H, W) in model space: queries ``u`` (N, C, H, W), rows
``y`` (M, C, H, W) (any shapes with those trailing sizes, or flat rows with
``image_shape``). ``k`` is the odd patch size, ``r = k // 2``.

Windows (docs/design.md, section 1; issue 21): ``Omega_p`` is the k x k pixels centred at
position p, all channels.

* ``padding="circular"``: indices wrap around the image (k <= H and k <= W, so that no
  pixel is counted twice).
* ``padding="zero"``: the window is cut at the border and only in-image pixels are
  compared. For the equivariant denoiser a position p competes with the positions q whose
  window has the same in-image shape as p's (the translations that keep the cut window
  inside the image; Kamb & Ganguli's border-aware ELS machine); interior positions
  compete with every interior position.

Kinds:

* LS (``local_denoise``): w_i(p) = softmax_i(-||u[Omega_p] - y_i[Omega_p]||^2 / 2 sigma^2),
  D[:, p] = sum_i w_i(p) y_i[:, p].
* ELS (``equivariant_denoise``): w_(i,q)(p) = softmax over images i and positions q of
  -||u[Omega_p] - y_i[Omega_q]||^2 / 2 sigma^2, D[:, p] = sum w_(i,q)(p) y_i[:, q].
* Composite (``composite_denoise``): m_p = sum_i w_i(p) y_i[Omega_p] (the LS posterior's
  patch mean); D at a pixel is the mean of m_p over the positions p whose window covers it.
"""
from __future__ import annotations

import numpy as np

from .dense import _as_2d, _sigma  # private: the oracles share one input conversion

__all__ = ["window", "window_shape", "local_logits", "local_denoise", "equivariant_logits",
           "equivariant_denoise", "composite_denoise"]

PADDINGS = ("circular", "zero")


def _images(a, image_shape) -> np.ndarray:
    """(N, C, H, W) float64 from (N, C, H, W), (N, H, W) with image_shape, or flat rows."""
    flat = _as_2d(a)
    return flat.reshape(flat.shape[0], *image_shape)


def _shape(u, y, image_shape):
    if image_shape is None:
        image_shape = np.asarray(y.detach().cpu() if hasattr(y, "detach") else y).shape[1:]
    image_shape = tuple(int(s) for s in image_shape)
    if len(image_shape) == 2:
        image_shape = (1, *image_shape)
    if len(image_shape) != 3:
        raise ValueError(f"image_shape: expected (C, H, W), got {image_shape}")
    return image_shape


def window(p: tuple, image_hw: tuple, k: int, padding: str):
    """The pixels of the window at position p = (py, px): a list of ``(offset index, (y, x))``
    with the offset index ``(oy + r) * k + (ox + r)``; out-of-image pixels of a zero-padded
    window are left out."""
    if padding not in PADDINGS:
        raise ValueError(f"padding: expected one of {PADDINGS}, got {padding!r}")
    H, W = image_hw
    r = k // 2
    out = []
    for oy in range(-r, r + 1):
        for ox in range(-r, r + 1):
            y, x = p[0] + oy, p[1] + ox
            if padding == "circular":
                y, x = y % H, x % W
            elif not (0 <= y < H and 0 <= x < W):
                continue
            out.append(((oy + r) * k + (ox + r), (y, x)))
    return out


def window_shape(p: tuple, image_hw: tuple, k: int, padding: str) -> tuple:
    """The in-image offsets of p's window, as a hashable key: positions with equal keys
    compete in the zero-padded ELS; every position has the same key under circular padding."""
    return tuple(o for o, _ in window(p, image_hw, k, padding))


def _patch(imgs: np.ndarray, p: tuple, k: int, padding: str, offsets=None) -> np.ndarray:
    """The in-image values of the windows at p of a stack of images (M, C, H, W): (M, C, n),
    for the offsets of ``window`` in order (or the given offset indices, all in-image at p)."""
    win = window(p, imgs.shape[2:], k, padding)
    pix = dict(win)
    keys = [o for o, _ in win] if offsets is None else offsets
    ys = [pix[o][0] for o in keys]
    xs = [pix[o][1] for o in keys]
    return imgs[:, :, ys, xs]


def _positions(image_shape):
    return [(py, px) for py in range(image_shape[1]) for px in range(image_shape[2])]


def _softmax_mean(lg: np.ndarray, vals: np.ndarray) -> np.ndarray:
    """sum_j softmax(lg)_j vals_j for lg (M,) and vals (M, ...)."""
    w = np.exp(lg - lg.max())
    w /= w.sum()
    return np.tensordot(w, vals, axes=(0, 0))


def local_logits(u, y, sigma, k: int, padding: str = "circular", image_shape=None) -> np.ndarray:
    """LS logits -||u[Omega_p] - y_i[Omega_p]||^2 / (2 sigma^2): (N, H, W, M) float64."""
    shape = _shape(u, y, image_shape)
    U, Y = _images(u, shape), _images(y, shape)
    s = _sigma(sigma, U.shape[0])
    out = np.empty((U.shape[0], shape[1], shape[2], Y.shape[0]))
    for p in _positions(shape):
        qy = _patch(Y, p, k, padding)  # (M, C, n)
        for n in range(U.shape[0]):
            qx = _patch(U[n : n + 1], p, k, padding)  # (1, C, n)
            out[n, p[0], p[1]] = -((qx - qy) ** 2).sum((1, 2)) / (2.0 * s[n] ** 2)
    return out


def local_denoise(u, y, sigma, k: int, padding: str = "circular", image_shape=None) -> np.ndarray:
    """The local score machine's denoiser (LS): (N, C, H, W) float64."""
    shape = _shape(u, y, image_shape)
    Y = _images(y, shape)
    lg = local_logits(u, y, sigma, k, padding, shape)
    out = np.empty((lg.shape[0], *shape))
    for n in range(lg.shape[0]):
        for py, px in _positions(shape):
            out[n, :, py, px] = _softmax_mean(lg[n, py, px], Y[:, :, py, px])
    return out


def equivariant_logits(u, y, sigma, k: int, padding: str = "circular", image_shape=None):
    """ELS logits of every output position against every competing (image, position).

    Returns ``(logits, candidates)``: logits[n][p] is a (M * len(candidates[p]),) array
    ordered image-major (image i, then the competing positions q in raster order), and
    candidates[p] the list of competing positions q of p (p as (py, px)).
    """
    shape = _shape(u, y, image_shape)
    U, Y = _images(u, shape), _images(y, shape)
    s = _sigma(sigma, U.shape[0])
    hw = shape[1:]
    keys = {p: window_shape(p, hw, k, padding) for p in _positions(shape)}
    cands = {p: [q for q in _positions(shape) if keys[q] == keys[p]] for p in keys}
    logits = [{} for _ in range(U.shape[0])]
    for key in set(keys.values()):
        members = [p for p in keys if keys[p] == key]
        offs = list(key)
        # (M, Q, C, n): the windows of every row at every competing position, image-major
        qy = np.stack([_patch(Y, q, k, padding, offs) for q in members], axis=1)
        qy = qy.reshape(-1, *qy.shape[2:])
        for p in members:
            for n in range(U.shape[0]):
                qx = _patch(U[n : n + 1], p, k, padding, offs)
                logits[n][p] = -((qx - qy) ** 2).sum((1, 2)) / (2.0 * s[n] ** 2)
    return logits, cands


def equivariant_denoise(u, y, sigma, k: int, padding: str = "circular", image_shape=None) -> np.ndarray:
    """The equivariant local score machine's denoiser (ELS): (N, C, H, W) float64."""
    shape = _shape(u, y, image_shape)
    Y = _images(y, shape)
    logits, cands = equivariant_logits(u, y, sigma, k, padding, shape)
    out = np.empty((len(logits), *shape))
    for p, qs in cands.items():
        ys = [q[0] for q in qs]
        xs = [q[1] for q in qs]
        vals = Y[:, :, ys, xs].transpose(0, 2, 1).reshape(-1, shape[0])  # (M * Q, C), image-major
        for n, per_p in enumerate(logits):
            out[n, :, p[0], p[1]] = _softmax_mean(per_p[p], vals)
    return out


def composite_denoise(u, y, sigma, k: int, padding: str = "circular", image_shape=None) -> np.ndarray:
    """The patch composite (PSPC-square): each pixel the mean, over the windows covering it,
    of the LS posterior's patch mean there. (N, C, H, W) float64."""
    shape = _shape(u, y, image_shape)
    Y = _images(y, shape)
    lg = local_logits(u, y, sigma, k, padding, shape)
    total = np.zeros((lg.shape[0], *shape))
    count = np.zeros(shape[1:])
    for py, px in _positions(shape):
        win = window((py, px), shape[1:], k, padding)
        for _, (qy, qx) in win:
            count[qy, qx] += 1
        patches = _patch(Y, (py, px), k, padding)  # (M, C, n)
        for n in range(lg.shape[0]):
            mean = _softmax_mean(lg[n, py, px], patches)  # (C, n)
            for j, (_, (qy, qx)) in enumerate(win):
                total[n, :, qy, qx] += mean[:, j]
    return total / count
