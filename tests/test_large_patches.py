"""The million-row patch sets (optden.data.large_patches, issue 22), built here at a coarse
stride so the test stays fast: the rows are the pictures' patches, distinct, textured as
asked, cached by recipe and rebuilt when the recipe changes."""
from __future__ import annotations

import json

import numpy as np
import pytest

import optden
from optden.data import demo, large_patches_dataset


def test_rows_are_the_distinct_textured_patches(tmp_path):
    size, stride = 8, 24
    ds = large_patches_dataset(size, stride, min_std=20.0, cache=tmp_path)
    assert ds.d == 3 * size * size and ds.M > 100
    x = np.asarray(ds.raw_rows(np.arange(ds.M)))
    assert len(np.unique(x, axis=0)) == ds.M  # distinct
    assert (x.astype(np.float64).std(axis=1) >= 20.0).all()
    # every row is a patch of its labelled picture at a grid position (channel-major)
    pics = dict(demo.source_pictures())
    labels = np.asarray(ds.labels)
    for r in np.random.default_rng(0).choice(ds.M, 5, replace=False):
        im = pics[int(labels[r])]
        win = np.lib.stride_tricks.sliding_window_view(im, (size, size), axis=(0, 1))[::stride, ::stride]
        flat = win.reshape(-1, 3 * size * size)  # (.., 3, size, size): channel-major
        assert (flat == x[r]).all(axis=1).any()
    # all the patches at this stride: at least as many rows as the textured subset
    every = large_patches_dataset(size, stride, min_std=None, cache=tmp_path)
    assert every.M > ds.M


def test_cache_and_recipe(tmp_path):
    ds = large_patches_dataset(8, 32, cache=tmp_path)
    again = large_patches_dataset(8, 32, cache=tmp_path)  # loaded, not rebuilt
    assert again.fingerprint == ds.fingerprint
    (folder,) = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    recipe = folder / "recipe.json"
    mtime = (folder / "data.npy").stat().st_mtime_ns
    assert large_patches_dataset(8, 32, cache=tmp_path) and (folder / "data.npy").stat().st_mtime_ns == mtime
    r = json.loads(recipe.read_text())
    r["sources"] = {"other": "0" * 64}  # other pictures: rebuilt
    recipe.write_text(json.dumps(r))
    rebuilt = large_patches_dataset(8, 32, cache=tmp_path)
    assert json.loads(recipe.read_text())["sources"] == demo.source_digests()
    assert rebuilt.fingerprint == ds.fingerprint


def test_bad_arguments(tmp_path):
    with pytest.raises(optden.InputError, match="size"):
        large_patches_dataset(0, cache=tmp_path)
    with pytest.raises(optden.InputError, match="stride"):
        large_patches_dataset(8, 0, cache=tmp_path)
    with pytest.raises(optden.InputError, match="min_std"):
        large_patches_dataset(8, 4, min_std=300, cache=tmp_path)
