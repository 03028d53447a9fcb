"""EDM networks as optden denoisers.

EDM's preconditioned networks (``EDMPrecond``, ``VPPrecond``, ``VEPrecond``, ``iDDPMPrecond``
in its training/networks.py, and the snapshots its training writes) are called
``net(x, sigma, class_labels=None)`` with x (B, C, H, W) in [-1, 1], sigma the VE noise
level (B,), and ``class_labels`` EDM's one-hot vectors (B, net.label_dim); they return
D(x; sigma) in float32. optden calls ``D(x, sigma, labels)`` with integer classes;
``as_denoiser(net)`` converts them to one-hot vectors, calls the network in chunks of
``batch_size`` on its own device and dtype (EDM's ``force_fp32`` default kept), checks
its output, and carries EDM's ``image_shape``. The network's own mapping of sigma (VP's
timestep, iDDPM's index) is left to it, as EDM's samplers do.

A snapshot: ``with open(path, "rb") as f: net = pickle.load(f)["ema"]`` with EDM's
repository on ``sys.path`` (its pickles name EDM's modules); only load files you trust.
"""
from __future__ import annotations

import torch

from ..calling import as_labels, call_in_chunks, output_tensor
from ..errors import InputError

__all__ = ["EDMDenoiser", "as_denoiser"]


class EDMDenoiser(torch.nn.Module):
    """``D(x, sigma, class_labels=None)`` of an EDM network (see ``as_denoiser``)."""

    def __init__(self, net, batch_size: int | None = None):
        super().__init__()
        if not callable(net):
            raise InputError(f"net: expected an EDM network net(x, sigma, class_labels), got {type(net).__name__}")
        self.net = net
        self.batch_size = batch_size
        self.label_dim = int(getattr(net, "label_dim", 0) or 0)
        res, ch = getattr(net, "img_resolution", None), getattr(net, "img_channels", None)
        if res is not None and ch is not None:
            h, w = (res, res) if isinstance(res, int) else tuple(res)
            self.image_shape = (int(ch), int(h), int(w))
        for name in ("sigma_min", "sigma_max", "round_sigma"):
            if hasattr(net, name):
                setattr(self, name, getattr(net, name))

    def forward(self, x: torch.Tensor, sigma, class_labels=None) -> torch.Tensor:
        b = x.shape[0]
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1).expand(b)
        one_hot = None
        if class_labels is not None:
            if self.label_dim == 0:
                raise InputError(f"class_labels: {type(self.net).__name__} is unconditional (label_dim 0)")
            lab = as_labels(class_labels.cpu() if isinstance(class_labels, torch.Tensor) else class_labels, b)
            if bool((lab < 0).any()) or bool((lab >= self.label_dim).any()):
                raise InputError(f"class_labels: expected classes in 0..{self.label_dim - 1}")
            one_hot = torch.nn.functional.one_hot(lab, self.label_dim).to(device=x.device, dtype=torch.float32)
        rest = (sigma,) if one_hot is None else (sigma, one_hot)
        return call_in_chunks(self._call, x, self.batch_size, *rest)

    def _call(self, x, sigma, one_hot=None):
        out = self.net(x, sigma, one_hot)
        out = output_tensor(out, self.net)
        if out.shape != x.shape:
            raise InputError(f"model: {type(self.net).__name__} returned shape {tuple(out.shape)} for an input of "
                             f"shape {tuple(x.shape)}")
        return out


def as_denoiser(net, batch_size: int | None = None) -> EDMDenoiser:
    """An EDM-style ``net(x, sigma, class_labels)`` as optden's ``D(x, sigma, labels)``:
    integer labels become EDM's one-hot vectors, batches run in chunks of ``batch_size``
    (None: whole), the output must be a tensor shaped like x (else an InputError naming
    the network)."""
    return EDMDenoiser(net, batch_size)
