"""``optden dataset build`` (optden.data.ingest): folder and zip, interrupted and resumed, bad images reported."""
from __future__ import annotations

import json
import shutil
import zipfile

import numpy as np
import pytest
from PIL import Image

import optden
import optden.data.ingest as ingest
from optden.cli import main

N_GOOD = 300


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A folder of 300 good 8x8 RGB PNGs (two subfolders, EDM dataset.json labels), a corrupt
    file and a wrong-size image; and a clean copy with only the good ones."""
    root = tmp_path_factory.mktemp("imgs")
    src, clean = root / "src", root / "clean"
    g = np.random.default_rng(0)
    labels = []
    for i in range(N_GOOD):
        rel = f"{i // 100:05d}/img{i:05d}.png"
        # smooth real-looking content: a gradient plus noise, different per image
        base = np.linspace(0, 255, 8)[None, :, None] * g.uniform(0.2, 1.0, 3)[None, None, :]
        img = np.clip(base + g.normal(0, 20, (8, 8, 3)), 0, 255).astype(np.uint8)
        for d in (src, clean):
            (d / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(d / rel)
        labels.append([rel, int(i % 7)])
    (src / "00001" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(src / "00002" / "big.png")
    for d in (src, clean):
        (d / "dataset.json").write_text(json.dumps({"labels": labels + [["00001/broken.png", 0],
                                                                       ["00002/big.png", 0]]}))
    z = root / "src.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for p in sorted(src.rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(src).as_posix())
    return src, clean, z


def test_folder_build_interrupted_resumes_and_reports_bad_images(images, tmp_path, monkeypatch):
    src, clean, _ = images
    out = tmp_path / "ds"
    real_npy = ingest.atomic_write_npy
    calls = {"n": 0}

    def crash_after_two_chunks(path, *args):
        calls["n"] += 1
        if calls["n"] == 3:  # chunk 0, chunk 1 (array and record), then chunk 2 dies
            raise KeyboardInterrupt
        real_npy(path, *args)

    monkeypatch.setattr(ingest, "atomic_write_npy", crash_after_two_chunks)
    with pytest.raises(KeyboardInterrupt):
        ingest.build_dataset(src, out, chunk_size=64, progress=False)
    assert not (out / "meta.json").exists()
    assert len(list((out / ".build").glob("chunk_*.npy"))) == 2
    monkeypatch.setattr(ingest, "atomic_write_npy", real_npy)

    decoded = []
    real_decode = ingest._decode
    monkeypatch.setattr(ingest, "_decode", lambda s, n, r: decoded.append(n) or real_decode(s, n, r))
    ds, rep = ingest.build_dataset(src, out, chunk_size=64, progress=False)
    assert rep.chunks == 5 and rep.chunks_skipped == 2
    assert len(decoded) == N_GOOD + 2 - 128  # only the chunks not on disk were decoded
    assert rep.images == N_GOOD + 2 and rep.accepted == N_GOOD
    why = dict(rep.rejected)
    assert set(why) == {"00001/broken.png", "00002/big.png"}
    assert "readable" in why["00001/broken.png"]
    assert "12x10" in why["00002/big.png"] and "expected 8x8" in why["00002/big.png"]
    assert json.loads((out / "rejected.json").read_text())["rejected"][0]["file"] == "00001/broken.png"
    assert not (out / ".build").exists()

    want = optden.Dataset.from_images(clean)
    assert ds.image_shape == (3, 8, 8) and ds.M == N_GOOD
    np.testing.assert_array_equal(np.asarray(ds.raw), np.asarray(want.raw))
    np.testing.assert_array_equal(ds.labels, want.labels)
    np.testing.assert_array_equal(ds.centered_sqnorms, want.centered_sqnorms)
    optden.Dataset.load(out, verify=True)  # checksums recorded and valid

    # built already: a rerun does nothing; another source into the same directory is refused
    ds2, rep2 = ingest.build_dataset(src, out, chunk_size=64, progress=False)
    assert rep2.already_built and ds2.M == N_GOOD and len(rep2.rejected) == 2
    with pytest.raises(optden.DatasetError, match="other images"):
        ingest.build_dataset(clean, out, chunk_size=64, progress=False)


def test_zip_build_equals_folder_build_and_damaged_chunk_is_redone(images, tmp_path):
    src, _, z = images
    a, _ = ingest.build_dataset(src, tmp_path / "a", chunk_size=100, progress=False)
    # a damaged chunk left by an interrupted build is detected by its checksum and rebuilt
    out = tmp_path / "b"
    build = out / ".build"
    build.mkdir(parents=True)
    src_names = ingest.list_images(z)
    first = src_names[:100]
    np.save(build / "chunk_000000.npy", np.zeros((100, 192), np.uint8))
    (build / "chunk_000000.json").write_text(json.dumps({"names": first, "kept": list(range(100)),
                                                          "rejected": [], "sha256": "0" * 64}))
    b, rep = ingest.build_dataset(z, out, chunk_size=100, progress=False)
    assert rep.chunks_skipped == 0 and rep.accepted == N_GOOD
    np.testing.assert_array_equal(np.asarray(a.raw), np.asarray(b.raw))
    np.testing.assert_array_equal(a.labels, b.labels)


def test_cli_build_info_strict_and_errors(images, tmp_path, capsys):
    src, clean, _ = images
    out = tmp_path / "cli"
    assert main(["dataset", "build", str(src), str(out), "--chunk-size", "128", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "300 accepted, 2 rejected" in text and "00001/broken.png" in text and "sha256" in text
    assert main(["dataset", "info", str(out), "--verify"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["M"] == N_GOOD and info["image_shape"] == [3, 8, 8] and info["rejected_images"] == 2
    assert main(["dataset", "build", str(src), str(tmp_path / "strict"), "--strict", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "2 image(s) cannot be used" in err and "big.png" in err and "broken.png" in err
    assert not (tmp_path / "strict" / "meta.json").exists()
    # --resolution resizes instead of rejecting the 12x10 image
    small = tmp_path / "two"
    (small / "x").mkdir(parents=True)
    shutil.copy(src / "00000" / "img00000.png", small / "x" / "a.png")
    shutil.copy(src / "00002" / "big.png", small / "x" / "b.png")
    assert main(["dataset", "build", str(small), str(tmp_path / "res"), "--resolution", "4", "--no-progress"]) == 0
    assert optden.Dataset.load(tmp_path / "res").image_shape == (3, 4, 4)
    assert main(["dataset", "build", str(tmp_path / "missing"), str(tmp_path / "m"), "--no-progress"]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(ValueError, match="chunk_size"):
        ingest.build_dataset(src, tmp_path / "z", chunk_size=0)
