"""Pictures: trajectory strips, samples beside their nearest training image (Pillow),
deviation / geometry / posterior-concentration curves against sigma and eigenvector
images (matplotlib, no pyplot).

The image grids write a PNG to ``path`` (parent folders created) and return the path; a
``title`` (the data set and the model, say) heads them. The curves and eigenvector images
draw into the matplotlib axes ``ax=`` when given (the caller's figure), else into a figure
of their own saved to ``path`` as PNG, SVG or PDF (by its suffix). Images are (n, C, H, W)
or (n, d) model-space tensors; ``value_range`` = (lo, hi) maps model values to 0..255
(default: the data set's own map for uint8 data, else (-1, 1)).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from .errors import InputError
from .validate import as_tensor, check_positive_int

__all__ = ["to_pictures", "trajectory_strip", "nearest_grid", "deviation_curves", "geometry_curves",
           "concentration_curves", "eigenvector_images", "agreement_curves"]

_PAD = 2
_BG = (255, 255, 255)


def _value_range(ds, value_range):
    if value_range is not None:
        lo, hi = (float(v) for v in value_range)
        if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
            raise InputError(f"value_range: expected finite lo < hi, got {value_range!r}")
        return lo, hi
    if ds is not None and getattr(ds, "dtype", None) == "uint8":
        return float(ds.offset), float(ds.offset + 255.0 * ds.scale)
    return -1.0, 1.0


def to_pictures(x, image_shape=None, value_range=(-1.0, 1.0)) -> np.ndarray:
    """Model-space images -> uint8 RGB pictures (n, H, W, 3), clipped.

    x: (n, C, H, W), or (n, d) with ``image_shape`` = (C, H, W); C = 1 or 3
    (grayscale is repeated into RGB). value_range (lo, hi) maps to 0..255.
    """
    t = as_tensor(x, "x").detach().to("cpu", torch.float64)
    if image_shape is not None:
        t = t.reshape(t.shape[0], *image_shape)
    if t.dim() != 4 or t.shape[1] not in (1, 3):
        raise InputError(f"x: expected images (n, C, H, W) with C = 1 or 3, got shape {tuple(t.shape)}")
    lo, hi = _value_range(None, value_range)
    pix = np.rint(np.clip((t.numpy() - lo) * (255.0 / (hi - lo)), 0, 255)).astype(np.uint8)
    pix = pix.transpose(0, 2, 3, 1)
    return np.repeat(pix, 3, axis=3) if pix.shape[3] == 1 else np.ascontiguousarray(pix)


def _tile(pic: np.ndarray, zoom: int):
    from PIL import Image

    return Image.fromarray(pic).resize((pic.shape[1] * zoom, pic.shape[0] * zoom), Image.NEAREST)


def _save(img, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG")
    return path


def _columns(count: int, max_columns: int) -> list[int]:
    if count <= max_columns:
        return list(range(count))
    return sorted(set(np.rint(np.linspace(0, count - 1, max_columns)).astype(int).tolist()))


_HEADER = 14  # pixels of a text header row (sigma labels, title)
#: Formats the curves are written in, by the suffix of ``path``.
FIGURE_FORMATS = ("png", "svg", "pdf")


def display_scale(sigma: float) -> float:
    """What a trajectory strip divides x_t (scaled coordinate u) by at noise level sigma:
    ``sqrt(1 + (3 sigma)^2)``, so the picture shows the data range [-1, 1] at small sigma
    and the noise's +-3 sigma at large sigma instead of clipping it to black and white."""
    return math.sqrt(1.0 + 9.0 * sigma * sigma) if math.isfinite(sigma) else math.inf


def _header(img, text: str, y: int = 1) -> None:
    """Centered one-line text at height y of a Pillow image."""
    from PIL import ImageDraw, ImageFont

    draw, font = ImageDraw.Draw(img), ImageFont.load_default()
    w = draw.textlength(text, font=font)
    draw.text((max(_PAD, (img.width - w) / 2), y), text, fill=(0, 0, 0), font=font)


def trajectory_strip(run, path, ds=None, samples=(0, 1, 2, 3), max_columns: int = 12, zoom: int = 4,
                     value_range=None, sigma_labels: bool = False, title: str | None = None) -> Path:
    """The paper's trajectory figure: for each chosen sample, the sampling trajectory x_t
    (noise to sample, left to right) over the denoising trajectory D(x_t).

    x_t is shown in the scaled coordinate divided by ``display_scale(sigma)`` (large-sigma
    noise rescaled into view, not clipped); D(x_t) as is.
    run: a ``SampleRun`` recorded with ``record=True`` (images (n, C, H, W)).
    samples: indices of the samples to show (one pair of rows each).
    max_columns: most trajectory points shown (evenly spaced, x_T and the sample kept).
    The denoising row under the final sample repeats the sample (D at sigma = 0 is the
    identity). sigma_labels: a header row with the sigma of each column (14 pixels);
    title: a header row above it (14 pixels).
    Picture size: width = cols * (W * zoom + 2) + 2, height = 2 * len(samples) * (H * zoom + 2)
    + 2 + 2 * (len(samples) - 1) (+ 14 with labels, + 14 with a title).
    """
    from PIL import Image, ImageDraw, ImageFont

    if getattr(run, "trajectory", None) is None or getattr(run, "denoised", None) is None:
        raise InputError("run: the SampleRun holds no trajectory; sample with record=True")
    zoom = check_positive_int(zoom, "zoom")
    max_columns = check_positive_int(max_columns, "max_columns", 2)
    n = run.samples.shape[0]
    idx = [int(i) for i in samples]
    if not idx or any(not 0 <= i < n for i in idx):
        raise InputError(f"samples: expected indices in 0..{n - 1}, got {list(samples)}")
    K = run.denoised.shape[0]
    cols = _columns(K + 1, max_columns)
    vr = _value_range(ds, value_range)
    shape = tuple(run.samples.shape[1:])
    # u / display_scale(sigma); at sigma = inf the run holds x_T = n itself, shown as n / 3
    shown = [run.trajectory[c][idx] / (display_scale(float(run.sigmas[c])) if math.isfinite(float(run.sigmas[c]))
                                        else 3.0) for c in cols]
    sample_pics = to_pictures(torch.stack(shown, 1).reshape(-1, *shape), value_range=vr)
    den_rows = torch.stack([run.denoised[c][idx] if c < K else run.samples[idx] for c in cols], 1)
    den_pics = to_pictures(den_rows.reshape(-1, *shape), value_range=vr)
    H, W = sample_pics.shape[1] * zoom, sample_pics.shape[2] * zoom
    ncol, nrow = len(cols), 2 * len(idx)
    width = ncol * (W + _PAD) + _PAD
    head = _HEADER if title else 0
    top = head + (_HEADER if sigma_labels else 0)
    height = nrow * (H + _PAD) + _PAD + _PAD * (len(idx) - 1) + top
    img = Image.new("RGB", (width, height), _BG)
    if title:
        _header(img, title)
    if sigma_labels:
        draw, font = ImageDraw.Draw(img), ImageFont.load_default()
        for c, k in enumerate(cols):
            sg = float(run.sigmas[k])
            text = "0" if sg == 0 else ("inf" if math.isinf(sg) else f"{sg:.2g}")
            w = draw.textlength(text, font=font)
            draw.text((_PAD + c * (W + _PAD) + (W - w) / 2, head + 1), text, fill=(0, 0, 0), font=font)
    for j in range(len(idx)):
        y0 = top + _PAD + j * (2 * (H + _PAD) + _PAD)
        for c in range(ncol):
            x0 = _PAD + c * (W + _PAD)
            img.paste(_tile(sample_pics[j * ncol + c], zoom), (x0, y0))
            img.paste(_tile(den_pics[j * ncol + c], zoom), (x0, y0 + H + _PAD))
    return _save(img, path)


def nearest_grid(samples, mem, ds, path, max_pairs: int = 32, per_row: int = 8, zoom: int = 4,
                 value_range=None, title: str | None = None) -> Path:
    """Samples beside their nearest training image: pairs (sample | nearest) in a grid.

    samples: (n, C, H, W) model space, or a ``SampleRun``; mem: ``Memorization`` of them;
    ds: the training ``Dataset``. A memorized pair gets a green frame, the others red.
    title: a header row (14 pixels) above the grid.
    Picture size: width = per_row * (2 W zoom + 3 * 2) + 2 (fewer pairs: fewer columns),
    height = rows * (H zoom + 2 * 2) + 2 (+ 14 with a title), rows = ceil(min(n, max_pairs) / per_row).
    """
    from PIL import Image

    from .sampling import SampleRun

    if isinstance(samples, SampleRun):
        samples = samples.samples
    x = as_tensor(samples, "samples").detach().to("cpu", torch.float64)
    x = x.reshape(x.shape[0], *ds.image_shape)
    zoom = check_positive_int(zoom, "zoom")
    per_row = check_positive_int(per_row, "per_row")
    k = min(x.shape[0], check_positive_int(max_pairs, "max_pairs"))
    if mem.n != x.shape[0]:
        raise InputError(f"mem: holds {mem.n} samples, samples has {x.shape[0]}")
    vr = _value_range(ds, value_range)
    pics = to_pictures(x[:k], value_range=vr)
    near = to_pictures(ds.images(mem.nn1_index[:k].numpy()), value_range=vr)
    H, W = pics.shape[1] * zoom, pics.shape[2] * zoom
    cols = min(per_row, k)
    rows = (k + per_row - 1) // per_row
    cell_w, cell_h = 2 * W + 3 * _PAD, H + 2 * _PAD
    top = _HEADER if title else 0
    img = Image.new("RGB", (cols * cell_w + _PAD, rows * cell_h + _PAD + top), _BG)
    if title:
        _header(img, title)
    for i in range(k):
        r, c = divmod(i, per_row)
        x0, y0 = _PAD + c * cell_w, _PAD + r * cell_h + top
        colour = (40, 160, 40) if bool(mem.memorized[i]) else (200, 40, 40)
        img.paste(Image.new("RGB", (cell_w - _PAD, cell_h - _PAD), colour), (x0, y0))
        img.paste(_tile(pics[i], zoom), (x0 + _PAD // 2 + 1, y0 + _PAD // 2 + 1))
        img.paste(_tile(near[i], zoom), (x0 + W + _PAD + 1, y0 + _PAD // 2 + 1))
    return _save(img, path)


def _axes(ax, ncols: int, width: float, height: float, path):
    """The panels to draw: the caller's ``ax`` (one Axes, or a sequence of up to ``ncols``),
    else those of a new figure (a ``path`` is then required)."""
    if ax is None:
        if path is None:
            raise InputError("path: required when no ax= is given (the figure is written there)")
        from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

        fig = Figure(figsize=(width, height), dpi=100)
        return fig, list(fig.subplots(1, ncols, squeeze=False)[0])
    axes = list(ax) if isinstance(ax, (list, tuple, np.ndarray)) else [ax]
    if not axes or len(axes) > ncols or not all(hasattr(a, "plot") for a in axes):
        raise InputError(f"ax: expected a matplotlib Axes or a sequence of 1..{ncols} of them, got {ax!r}")
    return None, axes


def _finish(fig, axes, path):
    """Write the figure (ours, or the caller's when a path is given) as PNG / SVG / PDF by
    the suffix of ``path``; returns the path, or the axes when nothing was written."""
    if path is None:
        return axes
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in FIGURE_FORMATS:
        raise InputError(f"path: expected a .png, .svg or .pdf file name, got {path.name!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if fig is None:
        fig = axes[0].figure
    else:
        fig.tight_layout()
    fig.savefig(path, format=fmt, dpi=100)
    return path


def deviation_curves(result, path=None, kinds=("model", "optimal", "paired"), width: float = 10.0,
                     height: float = 4.0, ax=None, title: str | None = None):
    """Score deviation against sigma (log-log): mean with the 5-95 % band of each kind,
    in denoiser space ``||D_theta - D*||`` (left) and score space ``/ sigma^2`` (right).

    result: a ``ScoreDeviation``. ax: one Axes (the denoiser-space panel only) or two, to
    draw into the caller's figure; else a figure of (width * 100, height * 100) pixels is
    written to ``path`` (.png, .svg or .pdf). title: the figure's (or the first panel's).
    Returns the path written, or the axes.
    """
    fig, panels = _axes(ax, 2, width, height, path)
    sig = result.sigmas.numpy()
    levels = result.quantile_levels.tolist()
    lo_i, hi_i = int(np.argmin(levels)), int(np.argmax(levels))
    labels = {"model": "on the model's trajectory", "optimal": "on the optimal trajectory",
              "paired": "each on its own trajectory"}
    spaces = (("", r"$\|D_\theta - D^*\|$"), ("score_", r"$\|D_\theta - D^*\| / \sigma^2$ (score)"))
    for a, (prefix, heading) in zip(panels, spaces):
        for kind in kinds:
            st = result.kind(kind)
            mean, q = getattr(st, prefix + "mean"), getattr(st, prefix + "quantiles")
            line, = a.plot(sig, mean.numpy(), marker="o", ms=3, label=labels[kind])
            a.fill_between(sig, q[:, lo_i].numpy(), q[:, hi_i].numpy(), color=line.get_color(), alpha=0.15)
        a.set_xscale("log")
        a.set_yscale("log")
        a.set_xlabel(r"$\sigma$")
        a.set_title(heading)
        a.invert_xaxis()
        a.grid(True, which="both", alpha=0.3)
    panels[0].legend(fontsize=8)
    _suptitle(fig, panels, title)
    return _finish(fig, panels, path)


def geometry_curves(geom, path=None, width: float = 14.0, height: float = 3.6, ax=None, title: str | None = None):
    """Trajectory geometry against sigma (means over samples, 10-90 % band): deviation from
    the chord, magnitudes, distance to the end point (each for x_t and D(x_t)), and the
    angle of the ODE direction to x_t - x_0.

    geom: a ``TrajectoryGeometry``. ax: up to four Axes of the caller's figure (the panels
    in that order); else a figure of (width * 100, height * 100) pixels is written to
    ``path`` (.png, .svg or .pdf). Returns the path written, or the axes.
    The final point (sigma = 0) is drawn at the smallest positive sigma / 2 on the log axis.
    """
    fig, axes = _axes(ax, 4, width, height, path)
    sig = geom.sigmas.clone()
    sig[-1] = sig[-2] / 2 if sig.numel() > 1 else 1.0
    ev = geom.eval_sigmas

    def band(ax, s, v, label):
        mean = torch.nanmean(v, 1).numpy()
        lo = torch.nanquantile(v, 0.1, dim=1).numpy()
        hi = torch.nanquantile(v, 0.9, dim=1).numpy()
        line, = ax.plot(s.numpy(), mean, marker="o", ms=3, label=label)
        ax.fill_between(s.numpy(), lo, hi, color=line.get_color(), alpha=0.15)

    xt, dn = r"sampling $x_t$", r"denoising $D(x_t)$"
    panels = (  # title, (x of the first series, first, its label), (second, its label) at eval sigmas, y scale
        ("deviation from the chord", (sig, geom.deviation, xt), (geom.denoised_deviation, dn), "linear"),
        ("magnitude", (sig, geom.magnitude, xt), (geom.denoised_magnitude, dn), "log"),
        ("distance to the final sample", (sig, geom.distance_to_end, xt), (geom.denoised_distance_to_end, dn), "log"),
        (r"angle to $x_t - x_0$ (degrees)", (ev, geom.tangent_angle, "ODE direction"),
         (geom.step_angle, "actual step"), "linear"),
    )
    for a, (heading, (x1, first, label1), (second, label2), yscale) in zip(axes, panels):
        band(a, x1, first, label1)
        band(a, ev, second, label2)
        a.set_title(heading)
        a.set_xscale("log")
        a.set_yscale(yscale)
        a.set_xlabel(r"$\sigma$")
        a.invert_xaxis()
        a.grid(True, which="both", alpha=0.3)
        a.legend(fontsize=7)
    _suptitle(fig, axes, title)
    return _finish(fig, axes, path)


def _suptitle(fig, axes, title) -> None:
    """The title of our own figure, or (the caller's figure) prefixed to the first panel's."""
    if not title:
        return
    if fig is not None:
        fig.suptitle(title)
    else:
        axes[0].set_title(f"{title}\n{axes[0].get_title()}")


def concentration_curves(diag, path=None, *, ax=None, width: float = 10.0, height: float = 3.8):
    """How concentrated the posterior is against sigma (the memorization alarm): the
    effective sample size (left, log scale, between 1 and M) and the weights' entropy
    (right), mean over samples with the 10-90 % band.

    diag: an ``optden.posterior.Diagnostics`` with (K, n) fields (``SampleRun.diagnostics``
    of ``sample(..., record=True)``) or (n,) fields at n sigmas (one curve, no band).
    ax: two matplotlib Axes to draw on (then nothing is saved and the axes are returned);
    else a new figure (width * 100, height * 100 pixels) is written to ``path`` (PNG, SVG or PDF).
    """
    fig, axes = _axes(ax, 2, width, height, path)
    if len(axes) != 2:
        raise InputError(f"ax: expected 2 matplotlib Axes (ESS, entropy), got {len(axes)}")
    a1, a2 = axes
    sig = diag.sigma if diag.sigma.dim() == 1 else diag.sigma[:, 0]
    for a, v, title in ((a1, diag.ess, "effective sample size 1 / sum w^2"), (a2, diag.entropy, "entropy of the weights")):
        v2 = v[:, None] if v.dim() == 1 else v
        mean = v2.double().mean(1).numpy()
        line, = a.plot(sig.numpy(), mean, marker="o", ms=3)
        if v2.shape[1] > 1:
            lo, hi = torch.quantile(v2.double(), 0.1, dim=1).numpy(), torch.quantile(v2.double(), 0.9, dim=1).numpy()
            a.fill_between(sig.numpy(), lo, hi, color=line.get_color(), alpha=0.15)
        a.set_xscale("log")
        a.set_xlabel(r"$\sigma$")
        a.set_title(title)
        a.invert_xaxis()
        a.grid(True, which="both", alpha=0.3)
    a1.set_yscale("log")
    return _finish(fig, axes, path)


def eigenvector_images(vectors, image_shape, path=None, *, ax=None, row_labels=None, col_labels=None,
                       width: float = 8.0, height: float | None = None):
    """Eigenvectors as images (e.g. of the Jacobian of D*, ``PosteriorCov.eig``): a grid
    with one row per query and one column per eigenvector, each scaled to its own largest
    magnitude (grayscale images on a diverging map, red > 0 > blue; RGB images as
    0.5 + 0.5 v / max |v|).

    vectors: (rows, k, d); image_shape: (C, H, W) with C = 1 or 3. ax: one matplotlib
    Axes to draw on (nothing saved; returned), else a new figure written to ``path``.
    """
    v = as_tensor(vectors, "vectors").detach().to("cpu", torch.float64)
    if v.dim() != 3:
        raise InputError(f"vectors: expected (rows, k, d), got shape {tuple(v.shape)}")
    C, H, W = (int(s) for s in image_shape)
    if C not in (1, 3) or C * H * W != v.shape[2]:
        raise InputError(f"image_shape: expected (C, H, W) with C = 1 or 3 and C H W = {v.shape[2]}, got {image_shape}")
    rows, k = v.shape[:2]
    scale = v.abs().amax(2, keepdim=True).clamp(min=1e-300)
    img = (v / scale).reshape(rows, k, C, H, W).permute(0, 3, 1, 4, 2)  # rows, H, k, W, C
    pad = torch.full((rows, H, k, 1, C), torch.nan, dtype=torch.float64)
    mosaic = torch.cat([img, pad], 3).reshape(rows, H, k * (W + 1), C)
    mosaic = torch.cat([mosaic, torch.full((rows, 1, k * (W + 1), C), torch.nan, dtype=torch.float64)], 1)
    mosaic = mosaic.reshape(rows * (H + 1), k * (W + 1), C).numpy()
    fig, (a,) = _axes(ax, 1, width, height if height is not None else width * rows * (H + 1) / (k * (W + 1)) + 0.6,
                      path)
    if C == 1:
        a.imshow(np.ma.masked_invalid(mosaic[..., 0]), cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
    else:
        a.imshow(np.nan_to_num(np.clip(0.5 + 0.5 * mosaic, 0.0, 1.0), nan=1.0), interpolation="nearest")
    a.set_xticks([j * (W + 1) + W / 2 for j in range(k)], col_labels or [str(j + 1) for j in range(k)], fontsize=7)
    a.set_yticks([i * (H + 1) + H / 2 for i in range(rows)], row_labels or [str(i) for i in range(rows)], fontsize=7)
    a.tick_params(length=0)
    return a if path is None else _finish(fig, [a], path)


def agreement_curves(result, path=None, width: float = 11.0, height: float = 4.0, ax=None, title: str | None = None):
    """How well each candidate explains the model against sigma: median r^2 over the samples
    with its 25-75 % band (left), and the MSE (right, log), one line per candidate and
    trajectory (solid: on the model's trajectory; dashed: on the candidate's own).

    result: an ``optden.agreement.Agreement``. ax: one Axes (the r^2 panel only) or two, to
    draw into the caller's figure; else a figure of (width * 100, height * 100) pixels is
    written to ``path`` (.png, .svg or .pdf). title: the figure's (or the first panel's).
    Returns the path written, or the axes.
    """
    fig, panels = _axes(ax, 2, width, height, path)
    sig = result.sigmas.numpy()
    colours = {}
    for traj, per in result.stats.items():
        style = "-" if traj == "model" else "--"
        for name, st in per.items():
            kw = {"color": colours[name]} if name in colours else {}
            label = f"{name} ({'model' if traj == 'model' else 'own'} trajectory)"
            line, = panels[0].plot(sig, st.r2_median.numpy(), style, marker="o", ms=3, label=label, **kw)
            colours[name] = line.get_color()
            q = torch.nanquantile(st.r2, torch.tensor([0.25, 0.75], dtype=st.r2.dtype), dim=1)
            panels[0].fill_between(sig, q[0].numpy(), q[1].numpy(), color=colours[name], alpha=0.12)
            if len(panels) > 1:
                panels[1].plot(sig, st.mse.numpy(), style, marker="o", ms=3, color=colours[name], label=label)
    panels[0].set_ylim(-0.2, 1.02)
    panels[0].set_title(r"$r^2$ of the candidate against the model (median)")
    if len(panels) > 1:
        panels[1].set_yscale("log")
        panels[1].set_title(r"MSE $\|D_\theta - D_c\|^2 / d$")
    for a in panels:
        a.set_xscale("log")
        a.set_xlabel(r"$\sigma$")
        a.invert_xaxis()
        a.grid(True, which="both", alpha=0.3)
    panels[0].legend(fontsize=7)
    _suptitle(fig, panels, title)
    return _finish(fig, panels, path)
