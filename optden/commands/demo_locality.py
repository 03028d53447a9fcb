"""The demo's locality section: a small CNN trained in the demo against D*, LS and ELS.

A convolutional denoiser sees only a window of the image around each output pixel (its
receptive field) and applies the same filters everywhere: it is local and translation
equivariant, which D* is not. On the CNN's own sampling trajectory (the field's
protocol, ``optden.agreement``) the r^2 of each closed form against the CNN says which
structure explains it: the local denoisers with the CNN's receptive field as patch size
should track it where D* does not.
"""
from __future__ import annotations

import math

#: 3 x 3 convolutions, so the receptive field (the local denoisers' patch size) is 2 * layers + 1.
CNN_LAYERS = 2


def _tiny_cnn_class():
    import torch

    class TinyCNN(torch.nn.Module):
        """``D(x, sigma) = c_skip x + c_out F(c_in x, c_noise)`` (EDM preconditioning) with F
        CNN_LAYERS circular 3 x 3 convolutions and a 1 x 1 output: receptive field
        2 CNN_LAYERS + 1. The noise level enters as one constant input channel.

        x: (B, *image_shape) model space; sigma: (B,). Returns (B, *image_shape).
        """

        def __init__(self, d: int, image_shape: tuple, sigma_data: float, hidden: int = 32):
            super().__init__()
            self.image_shape = tuple(image_shape)
            self.sigma_data = float(sigma_data)
            c = self.image_shape[0]
            layers, width = [], c + 1
            for _ in range(CNN_LAYERS):
                layers += [torch.nn.Conv2d(width, hidden, 3, padding=1, padding_mode="circular"), torch.nn.SiLU()]
                width = hidden
            self.net = torch.nn.Sequential(*layers, torch.nn.Conv2d(hidden, c, 1))

        def forward(self, x, sigma):
            b = x.shape[0]
            x = x.reshape(b, *self.image_shape)
            s = sigma.reshape(b, 1, 1, 1).to(x.dtype)
            sd2 = self.sigma_data**2
            c_skip, c_out = sd2 / (s**2 + sd2), s * self.sigma_data / torch.sqrt(s**2 + sd2)
            c_in = 1.0 / torch.sqrt(s**2 + sd2)
            noise = (torch.log(s) / 4.0).expand(b, 1, *self.image_shape[1:])
            return c_skip * x + c_out * self.net(torch.cat([c_in * x, noise], dim=1))

    return TinyCNN


def locality_section(ds, den, n: int, steps: int, train, train_steps: int, max_seconds: float, seed: int, out,
                     timings):
    """Train the CNN with ``train`` (the demo's ``train_tiny_denoiser``), compare it with D*,
    LS and ELS on its trajectory, draw the curves.

    Returns ``(summary dict, {figure name: path})``; timings gets "train_cnn" and "agreement".
    """
    import time

    from ..agreement import agreement
    from ..local import LocalDenoiser
    from ..plot import agreement_curves

    t0 = time.perf_counter()
    cnn, loss, done = train(ds, train_steps, seed, max_seconds=max_seconds, model_class=_tiny_cnn_class())
    timings["train_cnn"] = time.perf_counter() - t0
    k = 2 * CNN_LAYERS + 1
    cands = {"D*": den, f"LS (k={k})": LocalDenoiser(ds, k, kind="local", device=den.device),
             f"ELS (k={k})": LocalDenoiser(ds, k, kind="equivariant", device=den.device)}
    t0 = time.perf_counter()
    res = agreement(cnn.to(den.device), cands, n=n, steps=steps, seed=seed)
    timings["agreement"] = time.perf_counter() - t0
    path = agreement_curves(res, out / "agreement_cnn.png")
    per = res.stats["model"]
    mean_r2 = {name: float(st.r2_median.nanmean()) for name, st in per.items()}
    summary = {"train_steps": done, "final_loss": loss, "train_seconds": timings["train_cnn"],
               "receptive_field": k, "mean_median_r2": mean_r2, **res.to_dict()}
    best = max(mean_r2, key=lambda c: mean_r2[c] if math.isfinite(mean_r2[c]) else -math.inf)
    print(f"locality    CNN (receptive field {k}x{k}) trained {done} steps in {timings['train_cnn']:.2f} s "
          f"(loss {loss:.3g}); median r^2 on its trajectory, mean over sigma: "
          + ", ".join(f"{c} {v:.3f}" for c, v in mean_r2.items()) + f"; best {best}")
    return summary, {"agreement_cnn": path}


def locality_markdown(s: dict, fig: str) -> list:
    """The summary.md lines of the section."""
    names = list(s["mean_median_r2"])
    L = ["## Locality: a small CNN against D*, LS and ELS", "",
         f"A CNN of {CNN_LAYERS} circular 3x3 convolutions (receptive field {s['receptive_field']}x"
         f"{s['receptive_field']}), trained {s['train_steps']} steps in {s['train_seconds']:.1f} s (final loss "
         f"{s['final_loss']:.3g}), sampled with its own Heun sampler; at every step each closed form is compared "
         "with the CNN's output at the same point (median r^2 over the samples):", "",
         "| sigma | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
    for i, sg in enumerate(s["sigmas"]):
        L.append(f"| {sg:.4g} | " + " | ".join(f"{s['model'][c]['r2_median'][i]:.3f}" for c in names) + " |")
    L += ["", f"![agreement]({fig})", ""]
    return L
