"""A user's model that returns NaN, inf, the wrong layout or no tensor (issue 17, items 9, 10).

Every sampler, mean shift and the score deviation call models through
``calling.DenoiserCall``, which checks each output once: the error names the model, the
evaluation and sigma. Before, NaN flowed into results and a (B, d) output for a
(B, C, H, W) input was silently reshaped.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import optden
from optden.calling import DenoiserCall
from optden.deviation import score_deviation
from optden.meanshift import mean_shift
from optden.sampling import sample


@pytest.fixture(scope="module")
def den():
    return optden.OptimalDenoiser(optden.Dataset.demo("digits", max_rows=200))


class Broken(torch.nn.Module):
    """A 'trained' model: the optimal denoiser, except that from evaluation ``after`` on it
    returns what ``kind`` says."""

    def __init__(self, den, kind: str, after: int = 3):
        super().__init__()
        self.den, self.kind, self.after, self.n = den, kind, after, 0
        self.register_buffer("dummy", torch.zeros(1, dtype=torch.float64))

    def forward(self, x, sigma, labels=None):
        self.n += 1
        out = self.den(x, sigma)
        if self.n < self.after:
            return out
        if self.kind == "nan":
            out = out.clone()
            out[0, 0, 0, 0] = torch.nan
        elif self.kind == "inf":
            out = out.clone()
            out[-1, 0, 1, 1] = -torch.inf
        elif self.kind == "flat":
            out = out.reshape(out.shape[0], -1)  # (B, d) for a (B, 1, 8, 8) input
        elif self.kind == "transposed":
            out = out.transpose(2, 3).reshape(out.shape[0], 8, 8, 1)  # NHWC-like: same numel
        elif self.kind == "none":
            out = None
        elif self.kind == "tuple":
            out = (out, sigma)
        elif self.kind == "int":
            out = out.round().to(torch.int64)
        return out


CASES = [("nan", optden.InputError, "1 NaN or inf value"), ("inf", optden.InputError, "NaN or inf"),
         ("flat", optden.InputError, r"returned shape \(4, 64\) for an input of shape \(4, 1, 8, 8\)"),
         ("transposed", optden.InputError, r"returned shape \(4, 8, 8, 1\)"),
         ("none", optden.InputError, "Broken returned None; expected a tensor"),
         ("tuple", optden.InputError, "Broken returned a tuple, not a tensor"),
         ("int", optden.DtypeError, "returned dtype torch.int64")]


@pytest.mark.parametrize("kind,err,msg", CASES)
def test_sample_names_model_evaluation_and_sigma(den, kind, err, msg):
    model = Broken(den, kind)
    with pytest.raises(err, match=msg) as e:
        sample(model, n=4, steps=4, seed=0, shape=(1, 8, 8), progress=False)
    text = str(e.value)
    assert text.startswith("den (Broken) at evaluation 3 (sigma = ")


@pytest.mark.parametrize("kind", ["nan", "flat", "tuple"])
def test_mean_shift_and_deviation_check_too(den, kind):
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with pytest.raises(optden.OptdenError, match="den \\(Broken\\) at evaluation 2"):
        mean_shift(Broken(den, kind, after=2), x, 0.3, max_iter=10, progress=False)
    with pytest.raises(optden.OptdenError, match="den \\(Broken\\) at evaluation"):
        score_deviation(Broken(den, kind, after=2), den, n=4, steps=4, seed=0)


def test_good_outputs_pass_unchanged(den):
    """float32 and numpy outputs of the right shape are fine; the check costs one isfinite."""
    call = DenoiserCall(lambda x, s: x.float() * 0.5)
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    out = call(x, 0.7)
    assert out.dtype == torch.float64 and torch.allclose(out, (x.float() * 0.5).double())
    call = DenoiserCall(lambda x, s: x.numpy() * 2)
    assert torch.equal(call(x, 0.7), x * 2)
    with pytest.raises(optden.InputError, match=r"den \(<lambda>\) at evaluation 1 \(sigma = 0.1..0.7\)"):
        DenoiserCall(lambda x, s: x * torch.nan)(x, torch.tensor([0.1, 0.7, 0.3]))
