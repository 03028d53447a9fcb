"""optden.agreement (r^2 and MSE of candidate denoisers against a model) and ``optden compare``."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import optden
from optden.agreement import agreement, r2_scores
from optden.cli import main
from optden.local import LocalDenoiser


@pytest.fixture(scope="module")
def ds(digits_u8):
    return optden.Dataset.from_array(digits_u8[:150].reshape(-1, 1, 8, 8), labels=np.arange(150) % 2)


def test_exported():
    assert optden.agreement is agreement and optden.LocalDenoiser is LocalDenoiser


def test_r2_scores_by_hand(rng):
    t = torch.from_numpy(rng.standard_normal((3, 4, 1, 5, 5)))
    p = t + 0.1 * torch.from_numpy(rng.standard_normal(t.shape))
    r2 = r2_scores(t, p)
    for k in range(3):
        for j in range(4):
            a, b = t[k, j].reshape(-1).numpy(), p[k, j].reshape(-1).numpy()
            assert r2[k, j].item() == pytest.approx(1 - ((a - b) ** 2).sum() / ((a - a.mean()) ** 2).sum(), rel=1e-12)
    assert torch.isnan(r2_scores(torch.ones(1, 1, 4), torch.zeros(1, 1, 4))).all()  # no variance to explain


def test_a_model_agrees_with_itself_and_covering_ls_is_dstar(ds):
    gauss = optden.GaussianDenoiser.fit(ds, image_shape=ds.image_shape)
    dstar = optden.OptimalDenoiser(ds)
    ls_cover = LocalDenoiser(ds, 15, padding="zero")  # every window is the whole image: D*
    res = agreement(gauss, {"self": gauss, "dstar": dstar, "ls15": ls_cover}, n=3, steps=4, trajectory="both")
    assert set(res.stats) == {"model", "candidate"} and res.sigmas.numel() == 4
    for traj in ("model", "candidate"):
        st = res.stats[traj]["self"]
        assert torch.allclose(st.r2, torch.ones_like(st.r2)) and (st.mse == 0).all()
        a, b = res.stats[traj]["dstar"], res.stats[traj]["ls15"]  # both within 1e-6 of D*
        torch.testing.assert_close(a.r2, b.r2, rtol=0, atol=1e-8)
        torch.testing.assert_close(a.mse, b.mse, rtol=1e-4, atol=1e-14)
    # on the model's trajectory the model's outputs are those of its own run
    out = res.to_dict()
    assert set(out["model"]) == {"self", "dstar", "ls15"} and len(out["sigmas"]) == 4
    assert (res.stats["model"]["dstar"].r2_median <= 1.0 + 1e-12).all()


def test_class_conditional_candidates(ds):
    gauss = optden.GaussianDenoiser.fit(ds, image_shape=ds.image_shape)
    ls = LocalDenoiser(ds, 3)

    def model(x, sigma, class_labels=None):  # a class-conditional model's signature (EDM's)
        return gauss(x, sigma)

    res = agreement(model, [ls], n=2, steps=3, labels=torch.tensor([0, 1]), shape=ds.image_shape)
    st = res.stats["model"]["local"]
    assert st.r2.shape == (3, 2) and torch.isfinite(st.mse).all()


def test_bad_arguments(ds):
    gauss = optden.GaussianDenoiser.fit(ds, image_shape=ds.image_shape)
    with pytest.raises(optden.InputError, match="trajectory"):
        agreement(gauss, [gauss], trajectory="optimal")
    with pytest.raises(optden.InputError, match="candidates"):
        agreement(gauss, {"x": 3})
    with pytest.raises(optden.InputError, match="candidates"):
        agreement(gauss, {})
    with pytest.raises(optden.InputError, match="solver"):
        agreement(gauss, [gauss], solver="edm_stochastic")
    with pytest.raises(optden.InputError, match="n"):
        agreement(gauss, [gauss], n=0)


def test_compare_command(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "digits", "--max-rows", "120", "--n", "2", "--steps", "3", "--candidates",
                 "dstar,local,composite,gaussian", "--patch-size", "5", "--padding", "zero", "--trajectory",
                 "both", "--out", str(out)]) == 0
    summary = json.loads((out / "compare.json").read_text())
    assert set(summary["model"]) == {"dstar", "local", "composite", "gaussian"} and len(summary["sigmas"]) == 3
    assert summary["model"]["gaussian"]["r2_median"] == pytest.approx([1.0] * 3)
    assert (out / "compare.png").stat().st_size > 1000
    assert "median r^2" in capsys.readouterr().out
    # class-conditional: the model, D* and the local denoiser all of class 3; figure as SVG
    assert main(["compare", "digits", "--max-rows", "150", "--n", "2", "--steps", "3", "--candidates",
                 "dstar,local,gaussian", "--label", "3", "--format", "svg", "--out", str(out / "c3")]) == 0
    summary = json.loads((out / "c3" / "compare.json").read_text())
    assert summary["label"] == 3 and summary["model"]["gaussian"]["r2_median"] == pytest.approx([1.0] * 3)
    assert (out / "c3" / "compare.svg").read_text().lstrip().startswith("<?xml")
    capsys.readouterr()
    assert main(["compare", "digits", "--candidates", "dstar,global", "--out", str(out)]) == 2
    assert "unknown candidate" in capsys.readouterr().err
