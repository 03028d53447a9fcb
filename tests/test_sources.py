"""Data sets in the formats researchers have (issue 18 item 4): .npy / .npz (NHWC detected
or refused), the CIFAR-10/100 python pickles, Hugging Face datasets folders and parquet
files, torch Datasets; float [0, 1] data mapped to [-1, 1] or the user told. Every file is
written here in its real layout from real images (sklearn digits, scikit-image patches);
nothing is downloaded."""
from __future__ import annotations

import io
import struct
import tarfile

import numpy as np
import pytest
import torch

import optden
from optden.data import Dataset
from optden.data.sources import ModelSpaceWarning, image_layout, kind_of, read_cifar

from tolerances import DENOISE_RTOL, rel_err


# ------------------------------------------------------------------ the CIFAR layout

def py2_pickle(obj) -> bytes:
    """``obj`` pickled as Python 2's cPickle (protocol 2) wrote the CIFAR batches: byte
    strings as STRING opcodes, numpy 1.x arrays as ``numpy.core.multiarray._reconstruct``
    with their raw bytes. Handles dict, list, tuple, str, int, bool, None, uint8 arrays."""
    out = [b"\x80\x02"]

    def put(o):
        if isinstance(o, bool):
            out.append(b"\x88" if o else b"\x89")
        elif o is None:
            out.append(b"N")
        elif isinstance(o, int):
            out.append(b"K" + bytes([o]) if 0 <= o < 256 else b"M" + struct.pack("<H", o) if 0 <= o < 65536
                       else b"J" + struct.pack("<i", o))
        elif isinstance(o, (str, bytes)):
            b = o.encode("latin1") if isinstance(o, str) else o
            out.append(b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<I", len(b)) + b)
        elif isinstance(o, tuple):
            out.append(b"(")
            for v in o:
                put(v)
            out.append(b"t")
        elif isinstance(o, list):
            out.append(b"](")
            for v in o:
                put(v)
            out.append(b"e")
        elif isinstance(o, dict):
            out.append(b"}(")
            for k, v in o.items():
                put(k)
                put(v)
            out.append(b"u")
        elif isinstance(o, np.ndarray) and o.dtype == np.uint8:
            out.append(b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n")
            put((0,))
            put("b")
            out.append(b"\x87R(")  # TUPLE3, REDUCE, then the state tuple
            put(1)
            put(tuple(o.shape))
            out.append(b"cnumpy\ndtype\n")
            put("u1")
            put(0)
            put(1)
            out.append(b"\x87R")
            put((3, "|", None, None, None, -1, -1, 0))
            out.append(b"b")  # BUILD the dtype
            put(False)
            put(o.tobytes())
            out.append(b"tb")  # close the state, BUILD the array
        else:
            raise TypeError(type(o))

    put(obj)
    out.append(b".")
    return b"".join(out)


def cifar_images(faces_u8, n: int, rng) -> np.ndarray:
    """n real 32 x 32 RGB images (uint8 (n, 3072), CIFAR's channel-major rows): 4 x 4 tiles of photo patches."""
    tiles = faces_u8.reshape(-1, 3, 8, 8)
    out = np.empty((n, 3, 32, 32), np.uint8)
    for i in range(n):
        pick = rng.choice(len(tiles), 16, replace=False)
        out[i] = tiles[pick].reshape(4, 4, 3, 8, 8).transpose(2, 0, 3, 1, 4).reshape(3, 32, 32)
    return out.reshape(n, -1)


def write_cifar(root, faces_u8, rng, hundred: bool = False, per_batch: int = 6, tar: bool = True):
    """A small cifar-10-python.tar.gz (or cifar-100-python) in the archive's exact layout."""
    folder = "cifar-100-python" if hundred else "cifar-10-batches-py"
    files, x_all, y_all = {}, {}, {}
    batches = ["train", "test"] if hundred else [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for b in batches:
        x = cifar_images(faces_u8, per_batch, rng)
        y = rng.integers(0, 100 if hundred else 10, per_batch).tolist()
        entry = {"batch_label": f"{b} batch", "data": x, "filenames": [f"img_{i}.png" for i in range(per_batch)]}
        if hundred:
            entry.update({"fine_labels": y, "coarse_labels": [v // 5 for v in y]})
        else:
            entry["labels"] = y
        files[b] = py2_pickle(entry)
        x_all[b], y_all[b] = x, y
    if hundred:
        files["meta"] = py2_pickle({"fine_label_names": [f"f{i}" for i in range(100)],
                                    "coarse_label_names": [f"c{i}" for i in range(20)]})
    else:
        files["batches.meta"] = py2_pickle({"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog",
                                                            "frog", "horse", "ship", "truck"],
                                            "num_cases_per_batch": per_batch, "num_vis": 3072})
    files["readme.html"] = b"<html></html>"
    if tar:
        path = root / ("cifar-100-python.tar.gz" if hundred else "cifar-10-python.tar.gz")
        with tarfile.open(path, "w:gz") as t:
            for name, data in files.items():
                info = tarfile.TarInfo(f"{folder}/{name}")
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    else:
        path = root / folder
        path.mkdir()
        for name, data in files.items():
            (path / name).write_bytes(data)
    return path, x_all, y_all


@pytest.mark.parametrize("hundred", [False, True])
@pytest.mark.parametrize("tar", [True, False])
def test_cifar_pickles(tmp_path, faces_u8, rng, hundred, tar):
    path, xs, ys = write_cifar(tmp_path, faces_u8, rng, hundred=hundred, tar=tar)
    train = [b for b in xs if b not in ("test", "test_batch")]
    test = [b for b in xs if b in ("test", "test_batch")]
    for spec in ([path, tmp_path] if not tar else [path]):  # the folder itself, or the folder holding it
        assert kind_of(spec) == "cifar"
        ds = Dataset.open(spec)
        assert (ds.M, ds.image_shape, ds.dtype, ds.num_classes) == (6 * len(train), (3, 32, 32), "uint8",
                                                                    100 if hundred else 10)
        np.testing.assert_array_equal(ds.raw, np.concatenate([xs[b] for b in train]))
        np.testing.assert_array_equal(ds.labels, np.concatenate([ys[b] for b in train]))
        assert (ds.scale, ds.offset) == (2 / 255, -1.0)
    test_ds = Dataset.open(path, split="test")
    np.testing.assert_array_equal(test_ds.raw, np.concatenate([xs[b] for b in test]))
    assert Dataset.open(path, split="all").M == 6 * len(xs)
    rows = read_cifar(path)
    assert rows.class_names[:2] == (["f0", "f1"] if hundred else ["airplane", "automobile"])
    # the rows are NCHW: a pixel of image 0 at (channel c, row r, column w) is data[c*1024 + r*32 + w]
    img = Dataset.open(path).images([0]).numpy()[0]
    assert img[2, 5, 7] == pytest.approx(int(xs[train[0]][0, 2 * 1024 + 5 * 32 + 7]) * 2 / 255 - 1)
    # and D* of the CIFAR set meets the contract against the float64 oracle
    den = optden.OptimalDenoiser(Dataset.open(path))
    q = rng.standard_normal((3, 3 * 32 * 32)) * 0.5
    for sigma in (0.05, 0.5, 5.0):
        want = optden.reference.denoise(q, den.dataset.model_rows(np.arange(den.M)).numpy(), sigma)
        assert rel_err(den(torch.from_numpy(q).reshape(3, 3, 32, 32), sigma).reshape(3, -1), want) <= DENOISE_RTOL


def test_cifar_refusals(tmp_path, faces_u8, rng):
    path, _, _ = write_cifar(tmp_path, faces_u8, rng, tar=False)
    with pytest.raises(optden.InputError, match="split"):
        Dataset.open(path, split="validation")
    # a pickle that asks for any class but numpy's arrays is refused, never run
    import pickle

    (path / "data_batch_1").write_bytes(pickle.dumps({"data": np.zeros((1, 3072), np.uint8),
                                                      "labels": [0], "x": np.random.default_rng()}, protocol=2))
    with pytest.raises(optden.DatasetError, match="refused to build"):
        Dataset.open(path)


# ------------------------------------------------------------------ .npy / .npz, layouts, model space

def test_layout_detection():
    assert image_layout((5, 3, 32, 32)) is False and image_layout((5, 32, 32, 3)) is True
    assert image_layout((5, 1, 8, 8)) is False and image_layout((5, 8, 8, 1)) is True
    assert image_layout((5, 4, 32, 32)) is False and image_layout((5, 32, 32, 4)) is True  # latents
    assert image_layout((5, 3, 5, 4)) is False and image_layout((5, 32, 64, 3)) is True  # not square
    for ambiguous in [(5, 8, 8, 8), (5, 3, 3, 8), (5, 16, 24, 20)]:
        with pytest.raises(optden.InputError, match="channels_last"):
            image_layout(ambiguous)
    assert image_layout((5, 8, 8, 8), channels_last=True) is True


@pytest.mark.parametrize("suffix", [".npy", ".npz"])
def test_npy_nhwc_detected_never_read_as_nchw(tmp_path, faces_u8, suffix):
    nchw = faces_u8.reshape(-1, 3, 8, 8)
    nhwc = np.ascontiguousarray(nchw.transpose(0, 2, 3, 1))
    path = tmp_path / f"x{suffix}"
    np.save(path, nhwc) if suffix == ".npy" else np.savez(path, images=nhwc, labels=np.arange(len(nhwc)) % 7)
    for ds in (Dataset.open(path), Dataset.from_npy(path)):
        assert ds.image_shape == (3, 8, 8)
        np.testing.assert_array_equal(ds.raw, nchw.reshape(len(nchw), -1))
    ambiguous = tmp_path / f"amb{suffix}"
    cube = np.zeros((4, 8, 8, 8), np.uint8)
    np.save(ambiguous, cube) if suffix == ".npy" else np.savez(ambiguous, x=cube)
    with pytest.raises(optden.InputError, match="channels_last"):
        Dataset.open(ambiguous)
    assert Dataset.open(ambiguous, channels_last=False).image_shape == (8, 8, 8)


def test_float_unit_range_mapped_or_told(tmp_path, digits_u8, rng):
    x01 = (digits_u8.reshape(-1, 1, 8, 8) / 255.0).astype(np.float32)
    np.save(tmp_path / "f.npy", x01)
    ds = Dataset.open(tmp_path / "f.npy")  # what the CLI uses: [0, 1] -> [-1, 1], said in the source
    assert (ds.scale, ds.offset, ds.dtype) == (2.0, -1.0, "float32") and "[-1, 1]" in repr(ds)
    np.testing.assert_allclose(ds.model_rows(np.arange(5)).numpy(), x01[:5].reshape(5, -1) * 2 - 1, rtol=1e-7)
    u8 = Dataset.from_array(digits_u8.reshape(-1, 1, 8, 8))
    assert np.abs(ds.model_rows(np.arange(ds.M)).numpy() - u8.model_rows(np.arange(ds.M)).numpy()).max() < 1e-6
    with pytest.warns(ModelSpaceWarning, match=r"\[0, 1\]"):
        kept = Dataset.from_npy(tmp_path / "f.npy")  # the Python constructors keep [0, 1] and say so
    assert (kept.scale, kept.offset) == (1.0, 0.0)
    assert Dataset.open(tmp_path / "f.npy", scale=1.0, offset=0.0).scale == 1.0
    wide = rng.standard_normal((10, 6)).astype(np.float32)  # not in [0, 1]: left as it is
    np.save(tmp_path / "w.npy", wide)
    assert (Dataset.open(tmp_path / "w.npy").scale, Dataset.open(tmp_path / "w.npy").offset) == (1.0, 0.0)


# ------------------------------------------------------------------ Hugging Face

def _hf_digits(digits_u8, n=40):
    datasets = pytest.importorskip("datasets", reason="the hf extra (pip install optden[hf]) is not installed")
    from PIL import Image

    from sklearn.datasets import load_digits

    y = load_digits().target[:n]
    imgs = [Image.fromarray(digits_u8[i].reshape(8, 8)) for i in range(n)]
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(i) for i in range(10)])})
    return datasets.Dataset.from_dict({"image": imgs, "label": y.tolist()}, features=feats), y


def test_hf_folder_and_parquet(tmp_path, digits_u8):
    hf, y = _hf_digits(digits_u8)
    import datasets

    hf.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": hf, "test": hf.select(range(5))}).save_to_disk(str(tmp_path / "dict"))
    hf.to_parquet(str(tmp_path / "digits.parquet"))
    (tmp_path / "shards").mkdir()
    hf.select(range(20)).to_parquet(str(tmp_path / "shards" / "train-00000-of-00002.parquet"))
    hf.select(range(20, 40)).to_parquet(str(tmp_path / "shards" / "train-00001-of-00002.parquet"))
    hf.select(range(5)).to_parquet(str(tmp_path / "shards" / "test-00000-of-00001.parquet"))
    want = digits_u8[:40]
    for spec in ("saved", "dict", "digits.parquet", "shards"):
        assert kind_of(tmp_path / spec) == "hf"
        ds = Dataset.open(tmp_path / spec)
        assert (ds.M, ds.image_shape, ds.dtype, ds.num_classes) == (40, (1, 8, 8), "uint8", 10), spec
        np.testing.assert_array_equal(ds.raw, want)
        np.testing.assert_array_equal(ds.labels, y)
    assert Dataset.open(tmp_path / "dict", split="test").M == 5
    assert Dataset.open(tmp_path / "shards", split="test").M == 5
    with pytest.raises(optden.InputError, match="image_column"):
        Dataset.open(tmp_path / "saved", image_column="pixels")


def test_hf_without_the_extra(tmp_path, monkeypatch, digits_u8):
    hf, _ = _hf_digits(digits_u8, 5)
    hf.to_parquet(str(tmp_path / "d.parquet"))
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(ImportError, match=r"optden\[hf\]"):
        Dataset.open(tmp_path / "d.parquet")


# ------------------------------------------------------------------ torch datasets

class DigitsTorch(torch.utils.data.Dataset):
    """A torch Dataset as torchvision's transforms leave them: (C, H, W) float in [0, 1]
    (ToTensor), (H, W, C) uint8 arrays, or PIL images, with integer labels."""

    def __init__(self, x, y, kind):
        self.x, self.y, self.kind = x, y, kind

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        img = self.x[i].reshape(8, 8)
        if self.kind == "tensor01":
            return torch.from_numpy(img[None] / 255.0).float(), torch.tensor(self.y[i])
        if self.kind == "hwc":
            return np.repeat(img[:, :, None], 3, axis=2), int(self.y[i])
        from PIL import Image

        return {"image": Image.fromarray(img), "label": int(self.y[i])}


@pytest.mark.parametrize("kind", ["tensor01", "hwc", "pil"])
def test_torch_dataset(digits_u8, kind):
    from sklearn.datasets import load_digits

    y = load_digits().target[:30]
    ds = Dataset.open(DigitsTorch(digits_u8[:30], y, kind))
    np.testing.assert_array_equal(ds.labels, y)
    ref = Dataset.from_array(digits_u8[:30].reshape(-1, 1, 8, 8))
    got = ds.model_rows(np.arange(30)).numpy()
    want = ref.model_rows(np.arange(30)).numpy()
    if kind == "hwc":
        assert ds.image_shape == (3, 8, 8)
        want = np.tile(want, 3)
    else:
        assert ds.image_shape == (1, 8, 8)
    assert ds.dtype == ("float32" if kind == "tensor01" else "uint8")
    assert np.abs(got - want).max() < 1e-6  # ToTensor's [0, 1] floats land on the same [-1, 1] values
    # D* of the torch-built set equals D* of the array-built one
    q = torch.randn(4, *ds.image_shape, dtype=torch.float64)
    ref_den = optden.OptimalDenoiser(Dataset.from_array(want.reshape(30, *ds.image_shape).astype(np.float32)))
    assert rel_err(optden.OptimalDenoiser(ds)(q, 0.3), ref_den(q, 0.3)) <= 1e-5


def test_torch_dataset_refusals():
    class Mixed(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return torch.zeros(1, 8, 8 + i), 0

    with pytest.raises(optden.DatasetError, match=r"dataset\[1\]"):
        Dataset.open(Mixed())


# ------------------------------------------------------------------ the CLI reads them all

def test_cli_build_and_use_every_source(tmp_path, faces_u8, digits_u8, rng, capsys):
    from optden.cli import main

    cifar, _, _ = write_cifar(tmp_path, faces_u8, rng)
    np.save(tmp_path / "hwc.npy", np.ascontiguousarray(digits_u8[:50].reshape(-1, 8, 8, 1)))
    assert main(["dataset", "build", str(cifar), str(tmp_path / "c10")]) == 0
    assert Dataset.load(tmp_path / "c10").M == 30
    assert main(["dataset", "build", str(tmp_path / "hwc.npy"), str(tmp_path / "d")]) == 0
    assert Dataset.load(tmp_path / "d").image_shape == (1, 8, 8)
    for data in (str(cifar), str(tmp_path / "hwc.npy"), "demo:digits"):
        out = tmp_path / f"ms_{abs(hash(data))}"
        assert main(["meanshift", data, "--n", "3", "--max-iter", "3", "--out", str(out)]) == 0, data
        assert (out / "modes.npy").is_file()
    (tmp_path / "pngs").mkdir()
    from PIL import Image

    Image.fromarray(digits_u8[0].reshape(8, 8)).save(tmp_path / "pngs" / "a.png")
    capsys.readouterr()
    assert main(["meanshift", str(tmp_path / "pngs"), "--n", "2", "--out", str(tmp_path / "x")]) == 2
    assert "optden dataset build" in capsys.readouterr().err
