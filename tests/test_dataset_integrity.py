"""A loaded dataset's files changed under it; meta.json edited (issue 17, items 4 and 5).

The cases that used to end in SIGBUS run in a subprocess, so that a regression shows as a
failed test rather than a dead test run.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import optden
from optden.cli import main
from optden.data import format as fmt

ROOT = Path(__file__).resolve().parent.parent


def _run(code: str, tmp_path: Path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture
def saved(tmp_path, digits_u8):
    d = tmp_path / "ds"
    optden.Dataset.from_array(digits_u8, labels=np.arange(len(digits_u8)) % 10).save(d)
    return d


# ----------------------------------------------------------------------------- item 4


CHANGES = ["truncate", "np.save over it", "cp over it", "rewrite in place", "replace"]


def test_data_file_changed_under_a_denoiser(saved, tmp_path):
    """Each way of changing data.npy under a loaded (memory-mapped) dataset: the next call
    raises DatasetError naming the file; before, a truncation killed the process with
    SIGBUS and a rewrite in place gave results from stale cached norms. (One subprocess
    runs the five, each on its own copy of the dataset.)"""
    proc = _run(f"""
        import os, shutil, numpy as np, torch, optden
        for change in {CHANGES!r}:
            d = "ds_" + change.replace(" ", "_")
            shutil.copytree({str(saved)!r}, d)
            ds = optden.Dataset.load(d)
            den = optden.OptimalDenoiser(ds)
            x = torch.zeros(2, 64, dtype=torch.float64)
            den(x, 0.5)  # the norms are cached, the rows mapped
            path = os.path.abspath(os.path.join(d, "data.npy"))
            raw = np.load(path)
            if change == "truncate":
                with open(path, "r+b") as f:
                    f.truncate(4096)
            elif change == "np.save over it":
                np.save(path, raw[::-1].copy())
            elif change == "cp over it":
                np.save("other.npy", 255 - raw)
                shutil.copyfile("other.npy", path)
            elif change == "rewrite in place":
                with open(path, "r+b") as f:
                    f.seek(200)
                    f.write(bytes(1000))
            else:
                np.save("other.npy", raw)
                os.replace("other.npy", path)
            try:
                den(x, 0.5)
            except optden.DatasetError as e:
                print(change, "| DatasetError:", e, flush=True)
            else:
                print(change, "| no error", flush=True)
    """, tmp_path)
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr[-2000:])
    lines = proc.stdout.strip().splitlines()
    assert [ln.split(" | ")[0] for ln in lines] == CHANGES, proc.stdout
    for ln in lines:
        assert "| DatasetError:" in ln and "data.npy" in ln and "load the dataset again" in ln, ln


def test_truncated_mid_pass_is_a_short_read_not_sigbus(saved, tmp_path):
    """Truncated after the pass-start check (here: the check is switched off): the rows are
    read with pread, so the pass sees a short read and raises."""
    proc = _run(f"""
        import torch, optden
        ds = optden.Dataset.load({str(saved)!r})
        den = optden.OptimalDenoiser(ds, backend="torch", block_rows=100)
        x = torch.zeros(2, 64, dtype=torch.float64)
        den(x, 0.5)
        ds.check_unchanged = lambda: None
        with open({str(saved / 'data.npy')!r}, "r+b") as f:
            f.truncate(20000)
        try:
            den(x, 0.5)
        except optden.DatasetError as e:
            print("DatasetError:", e)
    """, tmp_path)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert "DatasetError:" in proc.stdout and "truncated while in use" in proc.stdout, proc.stdout


def test_unchanged_file_and_a_resave_keep_working(saved):
    ds = optden.Dataset.load(saved)
    den = optden.OptimalDenoiser(ds)
    x = torch.zeros(1, 64, dtype=torch.float64)
    a = den(x, 0.3)
    os.utime(saved / "meta.json")  # other files do not matter
    ds.save(saved)  # re-saved over its own file: the dataset maps the new one
    assert torch.equal(den(x, 0.3), a)
    assert torch.equal(optden.OptimalDenoiser(optden.Dataset.load(saved))(x, 0.3), a)


# ----------------------------------------------------------------------------- item 5


@pytest.mark.parametrize("field,value", [("scale", 0.01), ("offset", -0.5), ("num_classes", None), ("num_classes", 11),
                                         ("image_shape", [1, 64, 1])])
def test_edited_meta_json_is_refused(field, value, saved, capsys):
    """Editing scale, offset or num_classes loaded without error (and passed `dataset info
    --verify`) while every result moved. meta_sha256 covers them: ChecksumError, with or
    without verify."""
    meta = json.loads((saved / "meta.json").read_text())
    meta[field] = value
    (saved / "meta.json").write_text(json.dumps(meta, indent=1))
    for verify in (True, False):
        with pytest.raises(optden.ChecksumError, match="meta.json: its fields"):
            optden.Dataset.load(saved, verify=verify)
    assert main(["dataset", "info", str(saved), "--verify"]) == 2
    assert "meta.json: its fields" in capsys.readouterr().err


def test_version_1_datasets_load_with_a_warning_and_resave(saved):
    meta = json.loads((saved / "meta.json").read_text())
    del meta["meta_sha256"]
    meta["version"] = 1
    (saved / "meta.json").write_text(json.dumps(meta, indent=1))
    with pytest.warns(UserWarning, match=r"format version 1.*Re-save it to add one: optden.Dataset.load"):
        ds = optden.Dataset.load(saved)
    ds.save(saved)
    meta = json.loads((saved / "meta.json").read_text())
    assert meta["version"] == fmt.FORMAT_VERSION == 2 and meta["meta_sha256"] == fmt.meta_sha256(meta)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optden.Dataset.load(saved)


def test_meta_checksum_is_canonical(saved):
    """Reformatting meta.json (indentation, key order) is not an edit."""
    meta = json.loads((saved / "meta.json").read_text())
    (saved / "meta.json").write_text(json.dumps(dict(reversed(list(meta.items())))))
    optden.Dataset.load(saved)
