"""The ``triton`` backend: the fused fp32/TF32 Triton pass of ``optden.kernels.dense``.

Runs on CUDA devices. Under ``TRITON_INTERPRET=1`` it runs on CPU tensors in Triton's
interpreter (how CI checks the kernels); the interpreter is slow, so there its priority
drops below the float64 torch backend and ``backend="auto"`` never takes it, while
``backend="triton"`` still forces it. Triton is imported only when a pass runs.

On a GPU the kernel is autotuned once per (query-count bucket, d, dtype path);
OPTDEN_TRITON_AUTOTUNE=0 uses one fixed configuration instead (no tuning delay).

Two passes: ``fused`` (``optden.kernels.dense``, any storage dtype) and ``gemm``
(``optden.kernels.dense_gemm`` with ``optden.engine.backends.gpu_gemm_pass``: exact int8
tensor-core logits, a weighted sum only where it can be DENSE; uint8 rows, d <= 131072).
OPTDEN_TRITON_PASS = auto (default) | fused | gemm. ``auto`` takes ``fused``: it is the pass
that has run on a GPU (H100, 2026-12-05: every GPU test and the float64 checks passed);
the GEMM pass has run only in Triton's interpreter and compiled for sm_90, so it is
opt-in until a GPU run of ``bench/gpu_check.sh`` (steps bench-pass, tests-gemm) passes.

The pass is coarse (fp32 accumulation): its rigorous error bound ``delta``
(``optden.engine.bounds.fp32_pass_delta``) lets ``optden.engine.precision.certify``
re-score the top-k rows in float64, or send the query to the float64 torch pass when
the bound is too wide.
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import os
import sys

import torch

from .. import dispatch
from ...errors import InputError
from ..dispatch import Backend
from ..partial import Partial
from .gpu_pass import plan_splits, run_pass

_KERNEL_MODULE = "optden.kernels.dense"
_PASSES = ("auto", "fused", "gemm")
_GEMM_MAX_D = 131072  # optden.kernels.dense_gemm.MAX_D (not imported here: that imports Triton)


def pass_name(dtype: str, d: int) -> str:
    """The pass OPTDEN_TRITON_PASS selects for rows of ``dtype`` and width ``d``: "fused" or "gemm"."""
    want = os.environ.get("OPTDEN_TRITON_PASS", "auto").strip().lower() or "auto"
    if want not in _PASSES:
        raise InputError(f"OPTDEN_TRITON_PASS: expected one of {_PASSES}, got {want!r}")
    if want == "auto":
        return "fused"  # until the GEMM pass has run on a GPU (module docstring)
    return want


def interpret_mode() -> bool:
    """Whether the Triton kernels run (or will run) in Triton's interpreter.

    Triton decides when the kernel module is imported (``TRITON_INTERPRET``); once it
    is imported, its ``INTERPRETED`` flag is what counts.
    """
    mod = sys.modules.get(_KERNEL_MODULE)
    if mod is not None:
        return bool(mod.INTERPRETED)
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


class TritonBackend(Backend):
    name = "triton"
    description = ("Triton passes (gemm: exact int8 tensor-core logits for uint8 rows; fused: TF32 tensor cores, "
                   "exact products, fp32 accumulation; certified); CUDA, or TRITON_INTERPRET=1 on CPU")
    max_d = 1 << 20
    max_d_why = "the fp32 error bound covers"

    @property
    def priority(self) -> int:  # type: ignore[override]
        # above the C++ cpu backend (10) on GPUs; below torch (0) in the slow interpreter
        return -1 if interpret_mode() else 20

    def availability(self) -> list[str]:
        if importlib.util.find_spec("triton") is None:
            return ["triton is not installed (pip install triton)"]
        if interpret_mode():
            return []
        if not torch.cuda.is_available():
            return ["no CUDA device (set TRITON_INTERPRET=1 to run the Triton kernels on CPU tensors in the interpreter)"]
        return []

    @property
    def devices(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("cpu",) if interpret_mode() else ("cuda",)

    @property
    def devices_note(self) -> str:  # type: ignore[override]
        if interpret_mode():
            return "TRITON_INTERPRET=1 runs the kernels in Triton's interpreter, on CPU tensors"
        return "TRITON_INTERPRET=1 runs them on CPU tensors in Triton's interpreter"

    def not_supported_reasons(self, device: torch.device, dtype: str, d: int) -> list[str]:
        why = super().not_supported_reasons(device, dtype, d)
        if pass_name(dtype, d) == "gemm" and (dtype != "uint8" or d > _GEMM_MAX_D):
            why.append(f"OPTDEN_TRITON_PASS=gemm runs uint8 rows of d <= {_GEMM_MAX_D} (got {dtype}, d = {d})")
        return why

    def partial(self, v: torch.Tensor, coef: torch.Tensor, source, k: int) -> Partial:
        """See ``Backend.partial``. v: (N, d) float64, coef: (N,) float64."""
        n, d = v.shape
        dtype = source.dtype
        if pass_name(dtype, d) == "gemm":
            from .gpu_gemm_pass import gemm_partial

            return gemm_partial(v, coef, source, k)
        K = importlib.import_module(_KERNEL_MODULE)
        on_gpu = v.is_cuda and not K.INTERPRETED
        tf32 = dtype != "float32" and (not on_gpu or torch.cuda.get_device_capability(v.device)[0] >= 8)
        hi, lo, resid = K.split_query_tf32(v) if tf32 else K.split_query_fp32(v)
        centered = dtype == "uint8"
        center32 = source.center.to(v.device, torch.float32).contiguous()
        coef32 = coef.to(torch.float32).contiguous()
        n_q = math.ceil(n / 16)
        target = 4 * torch.cuda.get_device_properties(v.device).multi_processor_count if on_gpu else 4

        def kernel(x, csq32, rps):
            return K.dense_partial(x, center32, csq32, hi, lo, coef32, rps, centered=centered, tf32=tf32)

        return run_pass(
            kernel, source, v, coef, k,
            pieces=2 if tf32 else 1,
            centered=centered,
            tiles_per_split=lambda rps: math.ceil(rps / K.BLOCK_M_MIN),
            block_m_max=K.BLOCK_M_MAX,
            resid=resid,
            rows_per_split_fn=lambda rows: plan_splits(rows, n, d, n_q, target),
        )


dispatch.register("triton", TritonBackend)
