"""The command line finishes the job (issue 18 item 5): the same data arguments for every
analysis command, sample's picture of samples beside their nearest training images, its
progress bar per solver step, EDM's stochastic-sampler options, figures into a caller's
axes and as SVG / PDF, titled report grids, large-sigma x_t rescaled instead of clipped."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

import optden
from optden.cli import main
from optden.plot import deviation_curves, display_scale, geometry_curves, nearest_grid, trajectory_strip


@pytest.fixture(scope="module")
def npy(tmp_path_factory, digits_u8):
    p = tmp_path_factory.mktemp("npy") / "digits_hwc.npy"
    np.save(p, np.ascontiguousarray(digits_u8[:300].reshape(-1, 8, 8, 1)))  # NHWC, detected
    return p


def test_sample_writes_its_nearest_picture_and_ticks_per_step(npy, tmp_path, capsys):
    out = tmp_path / "job"
    assert main(["sample", str(npy), "--n", "6", "--batch-size", "4", "--steps", "5", "--out", str(out),
                 "--progress"]) == 0
    printed = capsys.readouterr()
    with Image.open(out / "nearest.png") as im:
        assert im.size == (6 * (2 * 8 * 4 + 6) + 2, 8 * 4 + 4 + 2 + 14)  # 6 pairs in one row of 8, a title row
    assert "nearest.png" in printed.out
    # two batches of 5 Heun steps: the bar counts 10 solver steps, not 2 batches
    assert re.search(r"sample job: 100%.*\b10/10\b", printed.err), printed.err[-400:]


def test_edm_stochastic_options(tmp_path, capsys):
    base = ["sample", "demo:digits", "--n", "4", "--steps", "6", "--seed", "1"]
    assert main(base + ["--out", str(tmp_path / "heun")]) == 0
    assert main(base + ["--solver", "edm_stochastic", "--out", str(tmp_path / "s0")]) == 0
    assert main(base + ["--solver", "edm_stochastic", "--S-churn", "40", "--S-min", "0.05", "--S-max", "50",
                        "--S-noise", "1.003", "--out", str(tmp_path / "s40")]) == 0
    heun, s0, s40 = (np.load(tmp_path / d / "samples.npy") for d in ("heun", "s0", "s40"))
    assert np.array_equal(heun, s0) and not np.allclose(heun, s40)  # S_churn = 0 is Heun; 40 is not
    opts = json.loads((tmp_path / "s40" / "manifest.json").read_text())["params"]["solver_options"]
    assert opts == {"S_churn": 40.0, "S_min": 0.05, "S_max": 50.0, "S_noise": 1.003}
    capsys.readouterr()
    assert main(base + ["--S-churn", "40", "--out", str(tmp_path / "bad")]) == 2  # heun takes no options
    assert "S_churn" in capsys.readouterr().err


def test_analysis_commands_take_the_same_data_arguments(npy, tmp_path, capsys):
    assert main(["meanshift", str(npy), "--n", "4", "--label", "0", "--max-iter", "5", "--out",
                 str(tmp_path / "ms")]) == 2  # this .npy has no labels
    assert "labels" in capsys.readouterr().err
    assert main(["meanshift", "demo:digits", "--class-label", "3", "--n", "4", "--max-iter", "30",
                 "--out", str(tmp_path / "ms3")]) == 0
    s = json.loads((tmp_path / "ms3" / "meanshift.json").read_text())
    ds = optden.Dataset.demo("digits")
    assert s["label"] == 3 and set(ds.labels[s["nearest_index"]].tolist()) == {3}
    assert main(["deviation", str(npy), "--n", "4", "--steps", "4", "--format", "pdf", "--out",
                 str(tmp_path / "dev")]) == 0
    assert (tmp_path / "dev" / "deviation.pdf").read_bytes()[:5] == b"%PDF-"
    assert main(["deviation", "demo:digits", "--label", "7", "--n", "4", "--steps", "4", "--out",
                 str(tmp_path / "dev7")]) == 0
    assert json.loads((tmp_path / "dev7" / "deviation.json").read_text())["label"] == 7


@pytest.fixture(scope="module")
def run(digits_u8):
    den = optden.OptimalDenoiser(optden.Dataset.from_array(digits_u8.reshape(-1, 1, 8, 8)))
    return den, optden.sample(den, n=4, steps=8, seed=0, record=True)


def test_figures_into_the_callers_axes_and_as_svg_pdf(run, tmp_path):
    from matplotlib.figure import Figure

    den, r = run
    dev = optden.score_deviation(optden.GaussianDenoiser.fit(den.dataset), den, n=4, steps=5)
    fig = Figure()
    a, b = fig.subplots(1, 2)
    assert deviation_curves(dev, ax=[a, b]) == [a, b]
    assert len(a.lines) == 3 and a.get_xscale() == "log"
    geo = optden.trajectory_geometry(r)
    axes = Figure().subplots(1, 4)
    geometry_curves(geo, ax=axes, title="digits")
    assert axes[0].get_title().startswith("digits")
    assert deviation_curves(dev, tmp_path / "d.svg", title="digits: gaussian vs D*").read_text().find("<svg") >= 0
    assert geometry_curves(geo, tmp_path / "g.pdf").read_bytes()[:5] == b"%PDF-"
    own = Figure()
    p = deviation_curves(dev, tmp_path / "mine.png", ax=own.subplots())  # the caller's figure, written
    with Image.open(p) as im:
        assert im.size == tuple(int(v) for v in own.get_size_inches() * own.dpi)
    with pytest.raises(optden.InputError, match="png, .svg or .pdf"):
        deviation_curves(dev, tmp_path / "x.jpg")
    with pytest.raises(optden.InputError, match="path"):
        deviation_curves(dev)


def test_grids_are_titled_and_large_sigma_is_rescaled(run, tmp_path):
    den, r = run
    plain = trajectory_strip(r, tmp_path / "a.png", den.dataset, samples=(0,), sigma_labels=True)
    titled = trajectory_strip(r, tmp_path / "b.png", den.dataset, samples=(0,), sigma_labels=True,
                              title="digits (M=1797): optimal denoiser D*")
    with Image.open(plain) as a, Image.open(titled) as b:
        assert b.size == (a.size[0], a.size[1] + 14)
        top = np.asarray(b.convert("L"))[:14]
        assert (top < 128).any()  # the title is drawn
        # the x_T column (sigma = 80): noise shown within range, not clipped to black and white
        pic = np.asarray(a.convert("L"))[14 + 2: 14 + 2 + 32, 2: 2 + 32]
        assert ((pic == 0) | (pic == 255)).mean() < 0.05
    assert display_scale(0.0) == 1.0 and display_scale(80.0) == pytest.approx(240.0, rel=1e-4)
    mem = optden.memorization(r, den)
    g = nearest_grid(r, mem, den.dataset, tmp_path / "n.png", title="digits: D* | nearest")
    with Image.open(g) as im:
        assert (np.asarray(im.convert("L"))[:14] < 128).any()


def test_old_strip_clipped_noise():
    """What the rescaling fixes: x_T at sigma = 80 mapped as is is almost all black or white."""
    x = torch.randn(1, 1, 8, 8, dtype=torch.float64) * 80
    pix = optden.plot.to_pictures(x)
    assert ((pix == 0) | (pix == 255)).mean() > 0.9
