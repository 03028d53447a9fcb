"""The command line end to end through optden.cli.main: demo, meanshift, deviation, info;
bad arguments exit with code 2 and a message naming the argument."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import optden
from optden.cli import main


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, digits_u8):
    d = tmp_path_factory.mktemp("ds") / "digits200"
    optden.Dataset.from_array(digits_u8[:200].reshape(-1, 1, 8, 8)).save(d)
    return d


def test_demo_quick(tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["demo", "--quick", "--train-steps", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "memorized" in printed and "mean shift" in printed and "report" in printed
    s = json.loads((out / "summary.json").read_text())
    assert s["sampling"]["n"] == 16 and s["sampling"]["fraction_memorized"] >= 0.9
    assert s["mean_shift"]["converged"] == 16
    assert set(s["stand_in_models"]) == {"gaussian", "mlp"}
    loc = s["locality"]  # the CNN against D*, LS and ELS, r^2 per sigma on its trajectory
    assert set(loc["mean_median_r2"]) == {"D*", "LS (k=5)", "ELS (k=5)"} and len(loc["sigmas"]) == 10
    assert "agreement_cnn" in s["figures"]
    assert len(s["stand_in_models"]["gaussian"]["deviation"]["optimal"]["mean"]) == 10
    assert s["timings_seconds"]["total"] > 0
    # issue 20: the posterior section, ESS / entropy curves and the Jacobian's top eigenvectors
    assert {"concentration", "jacobian_eigenvectors"} <= set(s["figures"])
    post = s["posterior"]
    assert post["fraction_certified"] == 1.0 and len(post["ess_mean"]) == len(post["sigmas"])
    assert post["jacobian_eigen"] and all(  # residuals of Cov's pairs: Cov's eigenvalues are sigma^2 the Jacobian's
        max(e["residuals"]) < 1e-6 * e["sigma"] ** 2 * max(e["jacobian_eigenvalues"]) for e in post["jacobian_eigen"])
    md = (out / "summary.md").read_text()
    for name in s["figures"].values():
        assert f"]({name})" in md
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.size[0] > 0


def test_meanshift_on_a_dataset_directory(data_dir, tmp_path, capsys):
    out = tmp_path / "ms"
    assert main(["meanshift", str(data_dir), "--n", "6", "--sigma", "0.2", "--seed", "3", "--out", str(out)]) == 0
    s = json.loads((out / "meanshift.json").read_text())
    assert s["converged"] == 6 and s["fraction_back_to_start_row"] == 1.0
    assert np.load(out / "modes.npy").shape == (6, 1, 8, 8)
    assert (out / "modes.png").is_file()
    assert "6/6 converged" in capsys.readouterr().out
    assert main(["meanshift", "digits", "--annealed", "--start", "noise", "--n", "4", "--steps", "5",
                 "--max-iter", "2", "--out", str(tmp_path / "ms2")]) == 0


class Shrink(torch.nn.Module):
    def forward(self, x, sigma):
        return x / (1 + sigma.reshape(-1, 1, 1, 1) ** 2)


@pytest.mark.filterwarnings("ignore:`torch.jit")  # TorchScript is deprecated, still supported
def test_deviation_gaussian_and_saved_modules(data_dir, tmp_path, capsys):
    out = tmp_path / "dev"
    assert main(["deviation", str(data_dir), "--n", "4", "--steps", "5", "--solver", "euler", "--out", str(out)]) == 0
    s = json.loads((out / "deviation.json").read_text())
    assert len(s["sigmas"]) == 5 and s["model_spec"] == "gaussian" and s["solver"] == "euler"
    with Image.open(out / "deviation.png") as im:
        assert im.size == (1000, 400)
    path = tmp_path / "model.pt"
    torch.jit.script(Shrink()).save(str(path))
    assert main(["deviation", str(data_dir), "--model", str(path), "--n", "3", "--steps", "4",
                 "--schedule", "vp", "--out", str(tmp_path / "dev2")]) == 0
    s2 = json.loads((tmp_path / "dev2" / "deviation.json").read_text())
    assert s2["schedule"] == "vp" and all(np.isfinite(s2["optimal"]["mean"]))
    batch = torch.export.Dim("batch")
    x, sig = torch.zeros(4, 1, 8, 8, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    ep = torch.export.export(Shrink(), (x, sig), dynamic_shapes=({0: batch}, {0: batch}))
    torch.export.save(ep, str(tmp_path / "model.pt2"))
    assert main(["deviation", str(data_dir), "--model", str(tmp_path / "model.pt2"), "--n", "3", "--steps", "4",
                 "--schedule", "vp", "--out", str(tmp_path / "dev3")]) == 0
    s3 = json.loads((tmp_path / "dev3" / "deviation.json").read_text())
    assert s3["optimal"]["mean"] == pytest.approx(s2["optimal"]["mean"], rel=1e-12)  # the same model


def test_info(capsys):
    assert main(["info"]) == 0
    json.loads(capsys.readouterr().out)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["meanshift", "digits", "--n", "0"], "--n"),
        (["meanshift", "digits", "--sigma", "-1"], "--sigma"),
        (["meanshift", "digits", "--tol", "abc"], "--tol"),
        (["deviation", "digits", "--solver", "rk4"], "--solver"),
        (["deviation", "digits", "--schedule", "cosine"], "--schedule"),
        (["deviation", "digits", "--steps", "0"], "--steps"),
        (["demo", "--data", "cifar"], "--data"),
        (["demo", "--seed", "-3"], "--seed"),
    ],
)
def test_bad_arguments_exit_2(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["meanshift", "no_such_dataset_dir"], "data"),
        (["deviation", "digits", "--model", "missing_model.pt"], "model"),
        (["deviation", "digits", "--device", "nonsense"], "device"),
        (["meanshift", "digits", "--annealed", "--sigma", "100"], "sigma"),
    ],
)
def test_bad_values_exit_2(argv, needle, capsys, tmp_path):
    assert main(argv + ["--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "error" in err and needle in err


def test_every_listed_command_exists(capsys):
    """``optden --help`` lists exactly the subcommand modules of optden/commands/."""
    from optden.cli import COMMANDS, build_parser

    lines = build_parser().format_help().split("positional arguments:", 1)[1].splitlines()
    listed = [ln.split()[0] for ln in lines if ln.startswith("    ") and not ln.startswith("     ")]
    assert listed == list(COMMANDS)
    with pytest.raises(SystemExit):
        main(["bench"])  # never was a command: benchmarks are bench/*.py (make bench)
    assert "invalid choice: 'bench'" in capsys.readouterr().err


def test_index_embedding_then_auto_loads_it(tmp_path, digits_u8, capsys):
    # `optden index` builds the embedding by default (what load errors tell users to run),
    # and prune="auto" then loads it: the same rows and D* as the dense pass
    d = tmp_path / "digits300"
    optden.Dataset.from_array(digits_u8[:300].reshape(-1, 1, 8, 8)).save(d)
    assert main(["index", str(d), "--k", "12", "--leaf-size", "16"]) == 0
    out = capsys.readouterr().out
    assert "built embedding index of 300 x 64 rows" in out and "k=12" in out
    ds = optden.Dataset.load(d)
    idx = optden.prune.EmbeddingIndex.load(ds)
    assert idx.k == 12
    den = optden.OptimalDenoiser(ds, prune="auto")
    x = torch.from_numpy(np.asarray(ds.raw_rows(np.arange(5)).to(torch.float64)) * ds.scale + ds.offset)
    dense = optden.OptimalDenoiser(ds, prune="off")
    assert torch.allclose(den(x, 0.05), dense(x, 0.05), rtol=1e-9, atol=1e-12)
    assert den.pruner() is not None and den.pruner().index.kind == "embedding"
    with pytest.raises(SystemExit):
        main(["index", str(d), "--k", "0"])
    assert "--k" in capsys.readouterr().err
