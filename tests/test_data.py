"""optden.Dataset: constructors, float64 statistics, save/load, loaders, demo sets, errors."""
from __future__ import annotations

import io
import json
import os
import socket
import tracemalloc
import zipfile

import numpy as np
import pytest
import torch

import optden
import optden.data.dataset as data_mod
from optden import Dataset
from tolerances import FLOAT64_RTOL


# ----------------------------------------------------------------------------- helpers


def as_float64(ds: Dataset) -> np.ndarray:
    """The raw rows (M, d) as float64 values (bfloat16 bit patterns decoded)."""
    raw = np.asarray(ds.raw)
    if ds.dtype == "bfloat16":
        return torch.from_numpy(raw.view(np.int16).copy()).view(torch.bfloat16).double().numpy()
    return raw.astype(np.float64)


def check_stats(ds: Dataset) -> None:
    """center / centered_sqnorms / sqnorms against a plain numpy float64 computation."""
    x = as_float64(ds)
    assert ds.center.dtype == ds.centered_sqnorms.dtype == ds.sqnorms.dtype == np.float64
    assert ds.center.shape == (ds.d,) and ds.sqnorms.shape == (ds.M,)
    if ds.dtype == "uint8":
        # integral center within 1/2 of the mean: raw - center is exact in bf16/fp32
        np.testing.assert_array_equal(ds.center, np.round(ds.center))
        assert np.abs(ds.center - x.mean(0)).max() <= 0.5
        c = x - ds.center
        np.testing.assert_array_equal(ds.centered_sqnorms, (c * c).sum(1))  # exact integers
    else:
        np.testing.assert_allclose(ds.center, x.mean(0), rtol=FLOAT64_RTOL, atol=1e-12)
        c = x - ds.center
        np.testing.assert_allclose(ds.centered_sqnorms, (c * c).sum(1), rtol=FLOAT64_RTOL, atol=1e-12)
    m = x * ds.scale + ds.offset
    np.testing.assert_allclose(ds.sqnorms, (m * m).sum(1), rtol=FLOAT64_RTOL, atol=1e-12)


def png_bytes(a: np.ndarray, fmt: str = "PNG") -> bytes:
    """uint8 (H, W) or (H, W, 3) -> encoded image bytes (written with Pillow)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def decode(b: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(b)) as im:
        return np.asarray(im.convert("RGB"))


def bf16_bits(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().view(torch.int16).numpy().view(np.uint16)


# ----------------------------------------------------------------------------- from_array


def test_uint8_images_nchw(digits_u8, rng):
    x = digits_u8[:300].reshape(300, 1, 8, 8)
    ds = Dataset.from_array(x)
    assert (ds.M, ds.d, ds.image_shape, ds.dtype) == (300, 64, (1, 8, 8), "uint8")
    assert ds.labels is None and ds.num_classes is None
    # default affine map: 0 -> -1, 255 -> +1
    assert ds.scale == pytest.approx(2 / 255, rel=1e-15) and ds.offset == -1.0
    np.testing.assert_array_equal(ds.raw, digits_u8[:300])
    idx = rng.integers(0, 300, 7)
    np.testing.assert_allclose(ds.model_rows(idx).numpy(), digits_u8[idx] / 127.5 - 1.0, rtol=0, atol=1e-15)
    assert ds.raw_block(3, 10).dtype == torch.uint8
    check_stats(ds)
    # RGB (N, C, H, W) keeps its image shape; rows (N, d) have image_shape (d,)
    rgb = rng.integers(0, 256, (5, 3, 4, 6), dtype=np.uint8)
    assert Dataset.from_array(rgb).image_shape == (3, 4, 6)
    assert Dataset.from_array(torch.from_numpy(rgb)).image_shape == (3, 4, 6)
    assert Dataset.from_array(rgb.reshape(5, -1)).image_shape == (72,)
    hwc = Dataset.from_array(rgb.transpose(0, 2, 3, 1), channels_last=True)
    np.testing.assert_array_equal(hwc.raw, rgb.reshape(5, -1))


def test_uint8_rows_real_photo_and_custom_map(faces_u8):
    ds = Dataset.from_array(faces_u8, scale=1 / 255, offset=0.0)
    assert ds.image_shape == (192,) and ds.M == len(faces_u8)
    np.testing.assert_allclose(ds.model_rows([0, 5]).numpy(), faces_u8[[0, 5]] / 255.0, rtol=1e-15)
    check_stats(ds)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_float_data(dtype, kind, rng):
    y = rng.standard_normal((101, 13)) * 3 + 1  # d = 13, M = 101
    t = torch.from_numpy(y).to(getattr(torch, dtype))
    if kind == "torch":
        ds = Dataset.from_array(t)
    elif dtype == "bfloat16":
        ds = Dataset.from_array(bf16_bits(t), dtype="bfloat16")
    else:
        ds = Dataset.from_array(t.numpy())
    assert ds.dtype == dtype and ds.torch_dtype == getattr(torch, dtype)
    assert (ds.scale, ds.offset) == (1.0, 0.0)
    assert ds.raw_block(0, 101).dtype == getattr(torch, dtype)
    np.testing.assert_array_equal(ds.model_rows(np.arange(101)).numpy(), t.double().numpy())
    check_stats(ds)
    # custom map applies to float data too
    ds2 = Dataset.from_array(t, scale=0.5, offset=-2.0)
    np.testing.assert_array_equal(ds2.model_rows([3]).numpy(), t[3:4].double().numpy() * 0.5 - 2.0)
    check_stats(ds2)


def test_float64_and_dtype_conversion(rng):
    y = rng.standard_normal((9, 6))
    ds = Dataset.from_array(y)  # float64 -> float32 storage
    assert ds.dtype == "float32"
    np.testing.assert_array_equal(ds.raw, y.astype(np.float32))
    for target in ("float16", "bfloat16"):
        ds = Dataset.from_array(torch.from_numpy(y), dtype=target)
        ref = torch.from_numpy(y).to(getattr(torch, target)).double().numpy()
        np.testing.assert_array_equal(ds.model_rows(np.arange(9)).numpy(), ref)
    big_endian = y.astype(">f4")
    np.testing.assert_array_equal(Dataset.from_array(big_endian).raw, y.astype(np.float32))


def test_labels(digits_u8):
    from sklearn.datasets import load_digits

    target = load_digits().target
    ds = Dataset.from_array(digits_u8, labels=torch.from_numpy(target))
    assert ds.labels.dtype == np.int64 and ds.num_classes == 10
    np.testing.assert_array_equal(ds.labels, target)
    assert not ds.labels.flags.writeable
    np.testing.assert_array_equal(ds.rows_with_label(3), np.flatnonzero(target == 3))
    assert Dataset.from_array(digits_u8[:4], labels=[0, 0, 1, 1], num_classes=5).num_classes == 5
    x = digits_u8[:3]
    with pytest.raises(optden.InputError, match=r"labels: expected shape \(3,\)"):
        Dataset.from_array(x, labels=[0, 1])
    with pytest.raises(optden.InputError, match="labels: .*>= 0"):
        Dataset.from_array(x, labels=[0, -1, 2])
    with pytest.raises(optden.InputError, match="labels: expected integer class labels"):
        Dataset.from_array(x, labels=[0.0, 1.0, 2.0])
    with pytest.raises(optden.InputError, match="labels: expected integer class labels"):
        Dataset.from_array(x, labels=np.array([True, False, True]))
    with pytest.raises(optden.InputError, match="labels: .*5.*out of range.*num_classes"):
        Dataset.from_array(x, labels=[0, 1, 5], num_classes=3)
    with pytest.raises(optden.InputError, match="num_classes: given without labels"):
        Dataset.from_array(x, num_classes=3)


def test_stats_of_uint8_tie_rounds_half_up():
    ds = Dataset.from_array(np.array([[0, 10], [1, 10]], dtype=np.uint8))
    np.testing.assert_array_equal(ds.center, [1.0, 10.0])  # mean 0.5 -> 1
    np.testing.assert_array_equal(ds.centered_sqnorms, [1.0, 0.0])


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "x,err,pattern",
    [
        (np.zeros((0, 5), np.uint8), optden.DatasetError, "x: empty dataset"),
        (np.zeros((3, 0), np.float32), optden.DatasetError, "x: empty dataset"),
        (np.zeros(5, np.uint8), optden.InputError, r"x: expected rows \(N, d\)"),
        (np.zeros((2, 1, 2, 2, 2), np.uint8), optden.InputError, r"x: expected rows \(N, d\)"),
        (np.zeros((2, 3), np.complex64), optden.DtypeError, "x: complex"),
        (torch.zeros(2, 3, dtype=torch.complex64), optden.DtypeError, "x: complex"),
        (np.zeros((2, 3), bool), optden.DtypeError, "x: boolean"),
        (torch.zeros(2, 3, dtype=torch.bool), optden.DtypeError, "x: boolean"),
        (np.zeros((2, 3), object), optden.DtypeError, "x: expected a numeric array"),
        (np.zeros((2, 3), np.int32), optden.DtypeError, "x: integer data must be uint8"),
        (np.array([[1.0, np.nan]], np.float32), optden.InputError, "x: contains NaN or inf"),
        (np.array([[1.0], [np.inf]], np.float16), optden.InputError, r"x: contains NaN or inf \(first in row 1\)"),
        (torch.tensor([[1.0, float("-inf")]], dtype=torch.bfloat16), optden.InputError, "x: contains NaN or inf"),
        (np.array([[1.0, 1e300]]), optden.InputError, "x: contains NaN or inf"),  # overflows float32
    ],
)
def test_bad_arrays(x, err, pattern):
    with pytest.raises(err, match=pattern):
        Dataset.from_array(x)


def test_bad_arguments():
    x = np.zeros((3, 4), np.uint8)
    with pytest.raises(optden.InputError, match="scale: must be nonzero"):
        Dataset.from_array(x, scale=0)
    with pytest.raises(optden.InputError, match="scale: must be finite"):
        Dataset.from_array(x, scale=float("nan"))
    with pytest.raises(optden.DtypeError, match="offset: expected a real number"):
        Dataset.from_array(x, offset="0")
    with pytest.raises(optden.InputError, match=r"image_shape: \(3, 2\) does not hold the 4 values"):
        Dataset.from_array(x, image_shape=(3, 2))
    with pytest.raises(optden.DtypeError, match="dtype: float data cannot be stored as uint8"):
        Dataset.from_array(x.astype(np.float32), dtype="uint8")
    with pytest.raises(optden.DtypeError, match="dtype: uint8 images cannot be stored as float32"):
        Dataset.from_array(x, dtype="float32")
    with pytest.raises(optden.DtypeError, match="dtype: expected one of"):
        Dataset.from_array(x.astype(np.float32), dtype="float64")
    assert Dataset.from_array(x, image_shape=(1, 2, 2)).image_shape == (1, 2, 2)
    # every optden error is also the built-in a caller expects
    assert issubclass(optden.InputError, ValueError) and issubclass(optden.DtypeError, TypeError)
    assert issubclass(optden.DatasetNotFoundError, FileNotFoundError)


# ----------------------------------------------------------------------------- row access


def test_subset_labels_images_roundtrip(rng):
    q = rng.integers(0, 256, (23, 3, 5, 4), dtype=np.uint8)
    lab = rng.integers(0, 4, 23)
    ds = Dataset.from_array(q, labels=lab, num_classes=6)
    idx = np.array([4, 0, 22, 4])
    sub = ds.subset(idx)
    assert (sub.M, sub.image_shape, sub.num_classes, sub.scale, sub.offset) == (4, (3, 5, 4), 6, ds.scale, ds.offset)
    np.testing.assert_array_equal(sub.raw, q[idx].reshape(4, -1))
    np.testing.assert_array_equal(sub.labels, lab[idx])
    check_stats(sub)
    mask = lab == 2
    np.testing.assert_array_equal(ds.subset(mask).raw, q[mask].reshape(mask.sum(), -1))
    np.testing.assert_array_equal(ds.rows_with_label(2), np.flatnonzero(mask))
    assert ds.rows_with_label(5).size == 0  # a class with no rows
    im = ds.images(idx)
    assert im.shape == (4, 3, 5, 4) and im.dtype == torch.float64
    np.testing.assert_allclose(im.numpy(), q[idx] * (2 / 255) - 1, rtol=0, atol=1e-15)
    # to_uint8_images inverts the map exactly: (N, H, W, C)
    pix = ds.to_uint8_images(im)
    np.testing.assert_array_equal(pix, q[idx].transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(ds.to_uint8_images(im[0]), pix[:1])  # one image (C, H, W)
    np.testing.assert_array_equal(ds.to_uint8_images(im.reshape(4, -1).float()), pix)
    clipped = ds.to_uint8_images(torch.full((1, 3, 5, 4), 7.0))
    assert (clipped == 255).all()
    np.testing.assert_array_equal(ds.raw_rows(torch.tensor([22, 1])).numpy(), q[[22, 1]].reshape(2, -1))
    # errors name the argument
    with pytest.raises(optden.InputError, match="c: class label 6 is out of range 0..5"):
        ds.rows_with_label(6)
    with pytest.raises(optden.InputError, match="index: row index 23 is out of range"):
        ds.subset([23])
    with pytest.raises(optden.DatasetError, match="subset: the index selects no rows"):
        ds.subset([])
    with pytest.raises(optden.DtypeError, match="index: expected integer row indices"):
        ds.raw_rows([0.5])
    with pytest.raises(optden.InputError, match=r"x_model: expected \(N, \*\(3, 5, 4\)\)"):
        ds.to_uint8_images(torch.zeros(2, 7))
    with pytest.raises(optden.InputError, match="x_model: contains NaN"):
        ds.to_uint8_images(torch.full((1, 60), float("nan")))
    with pytest.raises(optden.InputError, match="rows_with_label: this dataset has no labels"):
        Dataset.from_array(q).rows_with_label(0)


def test_float_images_need_value_range(rng):
    t = torch.rand(3, 1, 4, 4, dtype=torch.float32)
    ds = Dataset.from_array(t)
    with pytest.raises(optden.InputError, match="value_range: this dataset stores float data"):
        ds.to_uint8_images(ds.images([0]))
    pix = ds.to_uint8_images(ds.images([0, 1, 2]), value_range=(0.0, 1.0))
    np.testing.assert_array_equal(pix, np.rint(t.double().numpy() * 255).astype(np.uint8).transpose(0, 2, 3, 1))


# ----------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("dtype", ["uint8", "float16", "bfloat16", "float32"])
def test_save_load_roundtrip(dtype, tmp_path, rng):
    if dtype == "uint8":
        x = torch.from_numpy(rng.integers(0, 256, (37, 2, 3, 5), dtype=np.uint8))
        kw = {"scale": 1 / 127.5, "offset": -1.0}
    else:
        x = torch.from_numpy(rng.standard_normal((37, 2, 3, 5))).to(getattr(torch, dtype))
        kw = {"scale": 2.0, "offset": 0.25}
    lab = rng.integers(0, 3, 37)
    ds = Dataset.from_array(x, labels=lab, num_classes=4, **kw)
    out = ds.save(tmp_path / "set")
    assert out == tmp_path / "set" and ds.path == out
    assert sorted(os.listdir(out)) == ["data.npy", "labels.npy", "meta.json", "norms.npz"]
    back = Dataset.load(out)
    assert back.is_memmap and back.path == out
    assert (back.M, back.d, back.image_shape, back.dtype) == (37, 30, (2, 3, 5), dtype)
    assert (back.scale, back.offset, back.num_classes) == (ds.scale, ds.offset, 4)
    np.testing.assert_array_equal(back.labels, lab)
    np.testing.assert_array_equal(np.asarray(back.raw), ds.raw)
    for a, b in ((back.center, ds.center), (back.centered_sqnorms, ds.centered_sqnorms), (back.sqnorms, ds.sqnorms)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(back.model_rows(np.arange(37)).numpy(), x.reshape(37, -1).double().numpy() * kw["scale"] + kw["offset"])
    assert back.raw_block(0, 5).dtype == getattr(torch, dtype)
    # saving a set without labels over it removes the stale labels file
    Dataset.from_array(x).save(out)
    again = Dataset.load(out)
    assert again.labels is None and not (out / "labels.npy").exists()
    assert again.scale == (2 / 255 if dtype == "uint8" else 1.0)


def test_load_verifies_checksum(tmp_path, digits_u8):
    d = Dataset.from_array(digits_u8[:100]).save(tmp_path / "s")
    f = d / "data.npy"
    blob = bytearray(f.read_bytes())
    blob[-7] ^= 0x01  # one bit in the array data, header intact
    f.write_bytes(bytes(blob))
    with pytest.raises(optden.ChecksumError, match="data.npy: sha256"):
        Dataset.load(d)
    # verify=False skips the checksum (sizes and header still checked): the flipped bit shows
    ds = Dataset.load(d, verify=False)
    assert int(np.asarray(ds.raw)[99, 57]) == int(digits_u8[99, 57]) ^ 1  # byte -7 of the file
    # a corrupt norms file is caught too
    Dataset.from_array(digits_u8[:100]).save(d)
    n = d / "norms.npz"
    blob = bytearray(n.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    n.write_bytes(bytes(blob))
    with pytest.raises(optden.ChecksumError, match="norms.npz"):
        Dataset.load(d)


@pytest.mark.parametrize("verify", [True, False])
def test_load_truncated(tmp_path, digits_u8, verify):
    d = Dataset.from_array(digits_u8[:50]).save(tmp_path / "s")
    f = d / "data.npy"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(optden.DatasetError, match="data.npy: truncated"):
        Dataset.load(d, verify=verify)
    f.write_bytes(f.read_bytes()[:20])  # not even a full header
    with pytest.raises(optden.DatasetError, match="data.npy"):
        Dataset.load(d, verify=verify)


def test_load_missing_and_bad_meta(tmp_path, digits_u8):
    with pytest.raises(optden.DatasetNotFoundError, match="dir: .* is not a directory"):
        Dataset.load(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError):  # the built-in a caller would catch
        Dataset.load(tmp_path / "nowhere")
    d = Dataset.from_array(digits_u8[:20], labels=np.arange(20) % 3).save(tmp_path / "s")
    meta = json.loads((d / "meta.json").read_text())
    (d / "meta.json").write_text("{not json")
    with pytest.raises(optden.DatasetError, match="meta.json: malformed"):
        Dataset.load(d)
    (d / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "M"}))
    with pytest.raises(optden.DatasetError, match="meta.json: malformed"):
        Dataset.load(d)
    (d / "meta.json").write_text(json.dumps({**meta, "M": 21}))  # an edit: meta_sha256 says so
    with pytest.raises(optden.ChecksumError, match="meta.json: its fields"):
        Dataset.load(d, verify=False)

    def signed(**fields):  # a meta.json consistent in itself, that disagrees with the files
        m = {**meta, **fields}
        return json.dumps({**m, "meta_sha256": data_mod.fmt.meta_sha256(m)})

    (d / "meta.json").write_text(signed(M=21))
    with pytest.raises(optden.DatasetError, match=r"meta.json says \(21, 64\)"):
        Dataset.load(d)
    (d / "meta.json").write_text(signed(dtype="float64"))
    with pytest.raises(optden.DatasetError, match="unknown dtype"):
        Dataset.load(d)
    (d / "meta.json").write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(optden.DatasetError, match="version 99 is not supported"):
        Dataset.load(d)
    (d / "meta.json").write_text(json.dumps(meta))
    (d / "labels.npy").unlink()
    with pytest.raises(optden.DatasetNotFoundError, match="missing labels.npy"):
        Dataset.load(d)
    (d / "meta.json").unlink()
    with pytest.raises(optden.DatasetNotFoundError, match="has no meta.json"):
        Dataset.load(d)


def test_save_is_atomic(tmp_path, digits_u8, monkeypatch):
    """A save interrupted before meta.json is committed leaves a directory that does not load."""
    d = tmp_path / "s"
    Dataset.from_array(digits_u8[:30]).save(d)
    real_replace = os.replace

    def crash_on_meta(src, dst):
        if os.path.basename(dst) == "meta.json":
            raise KeyboardInterrupt("power cut")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_meta)
    with pytest.raises(KeyboardInterrupt):
        Dataset.from_array(digits_u8[30:90]).save(d)
    monkeypatch.undo()
    # the new payload is in place, but the commit marker is not: nothing half-written loads
    assert not (d / "meta.json").exists()
    with pytest.raises(optden.DatasetNotFoundError, match="has no meta.json"):
        Dataset.load(d)
    assert not [p for p in os.listdir(d) if ".tmp-" in p]  # temporaries cleaned up
    Dataset.from_array(digits_u8[30:90]).save(d)
    np.testing.assert_array_equal(np.asarray(Dataset.load(d).raw), digits_u8[30:90])


def test_save_refuses_a_file(tmp_path, digits_u8):
    (tmp_path / "f").write_text("x")
    with pytest.raises(optden.DatasetError, match="dir: .* is not a directory"):
        Dataset.from_array(digits_u8[:3]).save(tmp_path / "f")


# ----------------------------------------------------------------------------- from_npy / npz


def test_from_npy_is_memmapped_and_streamed(tmp_path, rng, monkeypatch):
    M, d = 6001, 48  # float64 working copy 2.3 MB; blocks of 64 KiB
    x = rng.integers(0, 256, (M, d), dtype=np.uint8)
    x[17] = 255
    np.save(tmp_path / "x.npy", x)
    lab = rng.integers(0, 5, M)
    np.save(tmp_path / "y.npy", lab)
    monkeypatch.setattr(data_mod, "BLOCK_BYTES", 1 << 16)
    ds = Dataset.from_npy(tmp_path / "x.npy", labels=tmp_path / "y.npy")
    assert ds.is_memmap and isinstance(ds.raw, np.memmap) and str(ds.raw.filename) == str(tmp_path / "x.npy")
    np.testing.assert_array_equal(ds.labels, lab)
    tracemalloc.start()
    try:
        ds.centered_sqnorms
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < M * d * 8 / 4, f"stats used {peak} bytes: not computed in blocks"
    check_stats(ds)
    assert ds.default_block_rows(1 << 12) == (1 << 12) // d
    blocks = list(ds.iter_blocks(1000))
    assert [b[:2] for b in blocks][-1] == (6000, 6001) and len(blocks) == 7


def test_from_npy_float_and_shapes(tmp_path, rng):
    y = rng.standard_normal((40, 3, 4, 4)).astype(np.float32)
    np.save(tmp_path / "f32.npy", y)
    ds = Dataset.from_npy(tmp_path / "f32.npy")
    assert ds.is_memmap and ds.image_shape == (3, 4, 4) and ds.dtype == "float32"
    check_stats(ds)
    np.save(tmp_path / "f64.npy", y.astype(np.float64))
    ds = Dataset.from_npy(tmp_path / "f64.npy")  # converted in blocks into memory
    assert not ds.is_memmap and ds.dtype == "float32"
    np.testing.assert_array_equal(ds.raw, y.reshape(40, -1))
    t = torch.from_numpy(y).bfloat16()
    np.save(tmp_path / "bf.npy", bf16_bits(t))
    ds = Dataset.from_npy(tmp_path / "bf.npy", dtype="bfloat16")
    assert ds.is_memmap and ds.dtype == "bfloat16"
    np.testing.assert_array_equal(ds.model_rows(np.arange(40)).numpy(), t.reshape(40, -1).double().numpy())
    bad = y.copy()
    bad[33, 1, 2, 3] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(optden.InputError, match=r"path \(nan.npy\): contains NaN or inf \(first in row 33\)"):
        Dataset.from_npy(tmp_path / "nan.npy")
    np.save(tmp_path / "i32.npy", np.zeros((3, 4), np.int32))
    with pytest.raises(optden.DtypeError, match="path: integer data must be uint8"):
        Dataset.from_npy(tmp_path / "i32.npy")
    np.save(tmp_path / "empty.npy", np.zeros((0, 4), np.float32))
    with pytest.raises(optden.DatasetError, match="path: .* empty array"):
        Dataset.from_npy(tmp_path / "empty.npy")
    np.save(tmp_path / "fort.npy", np.asfortranarray(y.reshape(40, -1)))
    with pytest.raises(optden.DatasetError, match="Fortran-ordered"):
        Dataset.from_npy(tmp_path / "fort.npy")
    with pytest.raises(optden.DatasetNotFoundError, match="path: .* does not exist"):
        Dataset.from_npy(tmp_path / "missing.npy")
    (tmp_path / "trunc.npy").write_bytes((tmp_path / "f32.npy").read_bytes()[:-4])
    with pytest.raises(optden.DatasetError, match="truncated"):
        Dataset.from_npy(tmp_path / "trunc.npy")


def test_from_npz(tmp_path, digits_u8):
    from sklearn.datasets import load_digits

    lab = load_digits().target
    np.savez(tmp_path / "a.npz", x=digits_u8.reshape(-1, 1, 8, 8), labels=lab)
    ds = Dataset.from_npy(tmp_path / "a.npz")
    assert (ds.M, ds.image_shape, ds.num_classes) == (1797, (1, 8, 8), 10)
    np.testing.assert_array_equal(ds.raw, digits_u8)
    np.testing.assert_array_equal(ds.labels, lab)
    check_stats(ds)
    np.savez(tmp_path / "b.npz", foo=digits_u8, bar=digits_u8[:5])
    with pytest.raises(optden.DatasetError, match=r"path: b.npz holds arrays \['foo', 'bar'\]; pass key="):
        Dataset.from_npy(tmp_path / "b.npz")
    assert Dataset.from_npy(tmp_path / "b.npz", key="bar").M == 5
    with pytest.raises(optden.InputError, match="key: 'baz' is not in"):
        Dataset.from_npy(tmp_path / "b.npz", key="baz")
    blob = (tmp_path / "a.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(optden.DatasetError, match="path: .*cut.npz is not a valid .npz file"):
        Dataset.from_npy(tmp_path / "cut.npz")


# ----------------------------------------------------------------------------- from_images


def make_images(rng, n=6, h=5, w=7):
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n)]


def test_from_images_folder(tmp_path, rng):
    ims = make_images(rng)
    names = [f"b/{i:02d}.png" for i in range(3)] + [f"a{i}.png" for i in range(3)]
    for a, n in zip(ims, names):
        (tmp_path / n).parent.mkdir(exist_ok=True)
        (tmp_path / n).write_bytes(png_bytes(a))
    (tmp_path / "notes.txt").write_text("not an image")
    ds = Dataset.from_images(tmp_path)
    assert (ds.M, ds.image_shape, ds.dtype, ds.labels) == (6, (3, 5, 7), "uint8", None)
    order = sorted(range(6), key=lambda i: names[i])  # sorted relative paths
    np.testing.assert_array_equal(ds.raw, np.stack([ims[i].transpose(2, 0, 1).reshape(-1) for i in order]))
    check_stats(ds)
    # grayscale -> one channel; explicit labels in file order
    g = tmp_path / "gray"
    g.mkdir()
    gray = [rng.integers(0, 256, (4, 4), dtype=np.uint8) for _ in range(3)]
    for i, a in enumerate(gray):
        (g / f"{i}.png").write_bytes(png_bytes(a))
    ds = Dataset.from_images(g, labels=[2, 0, 1])
    assert ds.image_shape == (1, 4, 4)
    np.testing.assert_array_equal(ds.raw, np.stack(gray).reshape(3, -1))
    np.testing.assert_array_equal(ds.labels, [2, 0, 1])


def test_from_images_edm_zip_with_labels(tmp_path, rng):
    """The layout of EDM's dataset_tool.py: 00000/img00000000.png + dataset.json."""
    ims = make_images(rng, n=5, h=8, w=8)
    names = [f"{i // 3:05d}/img{i:08d}.png" for i in range(5)]
    labels = [6, 1, 0, 9, 6]
    z = tmp_path / "set.zip"
    with zipfile.ZipFile(z, "w") as f:
        for a, n in zip(ims, names):
            f.writestr(n, png_bytes(a))
        f.writestr("dataset.json", json.dumps({"labels": [[n, c] for n, c in zip(names[::-1], labels[::-1])]}))
    ds = Dataset.from_images(z)
    assert (ds.M, ds.image_shape, ds.num_classes) == (5, (3, 8, 8), 10)
    np.testing.assert_array_equal(ds.labels, labels)
    np.testing.assert_array_equal(ds.raw, np.stack([a.transpose(2, 0, 1).reshape(-1) for a in ims]))
    assert Dataset.from_images(z, labels=None).labels is None
    # EDM writes {"labels": null} for an unlabelled set
    z2 = tmp_path / "nolab.zip"
    with zipfile.ZipFile(z2, "w") as f:
        f.writestr(names[0], png_bytes(ims[0]))
        f.writestr("dataset.json", json.dumps({"labels": None}))
    assert Dataset.from_images(z2).labels is None
    # a dataset.json missing an image's label is an error that names the image
    z3 = tmp_path / "partial.zip"
    with zipfile.ZipFile(z3, "w") as f:
        for a, n in zip(ims, names):
            f.writestr(n, png_bytes(a))
        f.writestr("dataset.json", json.dumps({"labels": [[names[0], 1]]}))
    with pytest.raises(optden.DatasetError, match="no label for 4 image.*img00000001.png"):
        Dataset.from_images(z3)


def test_from_images_jpeg_zip(tmp_path, rng):
    ims = [np.clip(rng.normal(128, 40, (6, 6, 3)), 0, 255).astype(np.uint8) for _ in range(3)]
    blobs = [png_bytes(a, "JPEG") for a in ims]
    z = tmp_path / "j.zip"
    with zipfile.ZipFile(z, "w") as f:
        for i, b in enumerate(blobs):
            f.writestr(f"x{i}.jpg", b)
    ds = Dataset.from_images(z)
    np.testing.assert_array_equal(ds.raw, np.stack([decode(b).transpose(2, 0, 1).reshape(-1) for b in blobs]))


def test_from_images_mixed_sizes_and_resolution(tmp_path, rng):
    from PIL import Image

    (tmp_path / "a.png").write_bytes(png_bytes(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)))
    big = rng.integers(0, 256, (9, 12, 3), dtype=np.uint8)
    (tmp_path / "b.png").write_bytes(png_bytes(big))
    (tmp_path / "c.png").write_bytes(png_bytes(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)))
    with pytest.raises(optden.DatasetError, match=r"resolution=.*b.png: size 12x9 .* expected 6x6 .* like a.png"):
        Dataset.from_images(tmp_path)
    ds = Dataset.from_images(tmp_path, resolution=6)
    assert ds.image_shape == (3, 6, 6)
    want = np.asarray(Image.fromarray(big).resize((6, 6), Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(ds.raw[1], want.transpose(2, 0, 1).reshape(-1))
    assert Dataset.from_images(tmp_path, resolution=(4, 5)).image_shape == (3, 4, 5)
    with pytest.raises(optden.InputError, match="resolution: "):
        Dataset.from_images(tmp_path, resolution=(4, 5, 6))


def test_from_images_errors(tmp_path, rng):
    (tmp_path / "ok.png").write_bytes(png_bytes(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)))
    (tmp_path / "junk.png").write_bytes(b"this is not a PNG")
    good = png_bytes(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
    (tmp_path / "cut.png").write_bytes(good[: len(good) // 2])
    with pytest.raises(optden.DatasetError, match=r"2 image\(s\) cannot be used.*cut.png.*junk.png"):
        Dataset.from_images(tmp_path)
    with pytest.raises(optden.DatasetNotFoundError, match="path: .* does not exist"):
        Dataset.from_images(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(optden.DatasetError, match="holds no PNG/JPEG images"):
        Dataset.from_images(empty)
    (tmp_path / "fake.zip").write_bytes(b"PK not really")
    with pytest.raises(optden.DatasetError, match="neither a folder nor a readable zip"):
        Dataset.from_images(tmp_path / "fake.zip")


# ----------------------------------------------------------------------------- demo sets


def test_demo_digits():
    from sklearn.datasets import load_digits

    ds = Dataset.demo("digits")
    assert (ds.M, ds.d, ds.image_shape, ds.dtype, ds.num_classes) == (1797, 64, (1, 8, 8), "uint8", 10)
    dig = load_digits()
    np.testing.assert_array_equal(ds.labels, dig.target)
    assert set(np.unique(ds.labels)) == set(range(10))
    np.testing.assert_array_equal(ds.raw, np.rint(dig.data * 255 / 16).astype(np.uint8))
    assert ds.raw.max() == 255 and ds.raw.min() == 0
    small = Dataset.demo("digits", max_rows=100)
    np.testing.assert_array_equal(small.raw, ds.raw[:100])
    with pytest.raises(optden.InputError, match="max_rows: "):
        Dataset.demo("digits", max_rows=0)
    with pytest.raises(optden.InputError, match="name: unknown demo dataset 'cifar'"):
        Dataset.demo("cifar")


def test_demo_patches_real_and_offline(monkeypatch):
    from skimage import data as skdata

    def no_network(*args, **kwargs):
        raise AssertionError("demo('patches') tried to open a network connection")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    ds = Dataset.demo("patches", max_rows=3000)
    monkeypatch.undo()
    assert (ds.M, ds.d, ds.image_shape, ds.dtype, ds.num_classes) == (3000, 192, (3, 8, 8), "uint8", 10)
    assert len(np.unique(ds.labels)) >= 8  # drawn from most of the bundled photographs
    assert len(np.unique(ds.raw, axis=0)) == 3000  # duplicates (flat borders) were dropped
    # the label-0 rows are real 8x8 patches of scikit-image's astronaut on the stride-4 grid
    win = np.lib.stride_tricks.sliding_window_view(skdata.astronaut(), (8, 8), axis=(0, 1))[::4, ::4]
    grid = {r.tobytes() for r in win.reshape(-1, 192)}
    rows = ds.raw[ds.labels == 0]
    assert len(rows) > 100 and all(r.tobytes() in grid for r in rows)
    # the patches are textured photographs, not noise or constants
    assert 20 < float(ds.raw.std(axis=1).mean()) < 60
    sub = data_mod.patches_dataset(size=8, stride=64, unique=False)
    assert sub.M == sum(
        ((im.shape[0] - 8) // 64 + 1) * ((im.shape[1] - 8) // 64 + 1) for _, im in data_mod.demo.source_pictures()
    )


def test_memmapped_set_pickles_by_name_and_resaves_in_place(tmp_path, rng):
    """Workers (DataLoader, torch.distributed) get a memmapped set as its file name, not its data;
    saving a loaded set over its own directory is safe."""
    import pickle

    t = torch.from_numpy(rng.standard_normal((300, 64))).bfloat16()
    d = Dataset.from_array(t, labels=rng.integers(0, 2, 300)).save(tmp_path / "s")
    ds = Dataset.load(d)
    blob = pickle.dumps(ds)
    assert len(blob) < ds.nbytes  # the rows were not pickled
    back = pickle.loads(blob)
    assert back.is_memmap and back.dtype == "bfloat16"
    np.testing.assert_array_equal(back.model_rows(np.arange(300)).numpy(), t.double().numpy())
    np.testing.assert_array_equal(back.sqnorms, ds.sqnorms)
    ds.save(d)  # reads its own memmap while replacing the file
    again = Dataset.load(d)
    np.testing.assert_array_equal(np.asarray(again.raw), bf16_bits(t))
    np.testing.assert_array_equal(again.labels, ds.labels)


def test_fingerprint_is_the_content(tmp_path, digits_u8, monkeypatch):
    """One fingerprint: equal for equal content wherever the rows live (memory, a verified
    or unverified load), different when rows, map, labels or storage differ."""
    rows, lab = digits_u8[:50], np.arange(50) % 10
    a = Dataset.from_array(rows, labels=lab)
    assert a.fingerprint == Dataset.from_array(rows.copy(), labels=lab.copy()).fingerprint
    a.save(tmp_path / "a")
    assert Dataset.load(tmp_path / "a", verify=False).fingerprint == a.fingerprint  # computed from the rows
    calls = []
    monkeypatch.setattr(data_mod.fmt, "npy_sha256", lambda raw: calls.append(1) or "x")
    assert Dataset.load(tmp_path / "a").fingerprint == a.fingerprint  # the verified checksum, no second read
    assert not calls
    monkeypatch.undo()
    other = rows.copy()
    other[7, 3] ^= 1
    variants = [Dataset.from_array(other, labels=lab), Dataset.from_array(rows, labels=lab, scale=1 / 255),
                Dataset.from_array(rows, labels=(lab + 1) % 10), Dataset.from_array(rows),
                Dataset.from_array(rows.astype(np.float32), labels=lab, scale=2 / 255, offset=-1)]
    prints = {v.fingerprint for v in variants} | {a.fingerprint}
    assert len(prints) == len(variants) + 1
