"""Pictures: each function writes a PNG that Pillow opens, with the documented size."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import optden
from optden import plot
from optden.errors import InputError
from optden.gaussian import GaussianDenoiser


@pytest.fixture(scope="module")
def digits_run(digits_u8):
    ds = optden.Dataset.from_array(digits_u8[:150].reshape(-1, 1, 8, 8))
    den = optden.OptimalDenoiser(ds)
    return ds, den, optden.sample(den, n=5, steps=6, seed=0, record=True)


def test_trajectory_strip_size(digits_run, tmp_path):
    ds, _, run = digits_run
    p = plot.trajectory_strip(run, tmp_path / "a" / "strip.png", ds, samples=[0, 2, 4], max_columns=5, zoom=3)
    with Image.open(p) as im:
        assert im.format == "PNG"
        cols, H, W = 5, 8 * 3, 8 * 3
        assert im.size == (cols * (W + 2) + 2, 6 * (H + 2) + 2 + 2 * 2)
        # the last column of the sampling row is the sample itself
        pic = plot.to_pictures(run.samples[:1], value_range=(-1.0, 1.0))[0]
        x0, y0 = 2 + 4 * (W + 2), 2
        crop = np.asarray(im.convert("RGB"))[y0:y0 + H:3, x0:x0 + W:3]
        assert np.array_equal(crop, pic)
    p = plot.trajectory_strip(run, tmp_path / "labelled.png", ds, samples=[1], zoom=3, sigma_labels=True)
    with Image.open(p) as im:
        assert im.size == (7 * 26 + 2, 2 * 26 + 2 + 14)
        header = np.asarray(im.convert("L"))[:14]
        assert header.min() < 128  # the sigma values are drawn
    with pytest.raises(InputError, match="samples"):
        plot.trajectory_strip(run, tmp_path / "b.png", ds, samples=[9])
    with pytest.raises(InputError, match="record"):
        plot.trajectory_strip(optden.sample(optden.OptimalDenoiser(ds), n=2, steps=2), tmp_path / "c.png", ds)


def test_nearest_grid_rgb(faces_u8, tmp_path):
    ds = optden.Dataset.from_array(faces_u8[:300].reshape(-1, 3, 8, 8))
    y = ds.images(np.arange(7))
    mem = optden.memorization(y, ds)
    p = plot.nearest_grid(y, mem, ds, tmp_path / "nn.png", per_row=4, zoom=2)
    with Image.open(p) as im:
        W = H = 16
        assert im.size == (4 * (2 * W + 6) + 2, 2 * (H + 4) + 2)
        assert im.mode == "RGB"


def test_curves(digits_run, tmp_path):
    ds, den, run = digits_run
    geo = optden.trajectory_geometry(run)
    p = plot.geometry_curves(geo, tmp_path / "geo.png", width=8, height=3)
    with Image.open(p) as im:
        assert im.size == (800, 300)
    dev = optden.score_deviation(GaussianDenoiser.fit(ds), den, n=3, steps=4)
    p = plot.deviation_curves(dev, tmp_path / "dev.png", width=6, height=2.5)
    with Image.open(p) as im:
        assert im.size == (600, 250)


def test_to_pictures():
    x = torch.tensor([[[[-1.0, 0.0], [1.0, 3.0]]]], dtype=torch.float64)
    pic = plot.to_pictures(x)
    assert pic.shape == (1, 2, 2, 3) and pic[0, :, :, 0].tolist() == [[0, 128], [255, 255]]
    with pytest.raises(InputError, match="x"):
        plot.to_pictures(torch.zeros(2, 5, 4, 4))
    with pytest.raises(InputError, match="value_range"):
        plot.to_pictures(x, value_range=(1.0, 1.0))
