"""The ``cuda`` backend: the fp32 CUDA kernels of ``optden._C`` (csrc/cuda/).

Usable when the extension was built with CUDA (setup.py: nvcc and a CUDA build of torch,
or OPTDEN_CUDA=1) and a CUDA device is present. Tensors cross to the kernels as raw
device pointers on torch's current stream. The pass is coarse (fp32 FMA, one fp32
query piece); ``optden.engine.bounds.fp32_pass_delta`` gives its rigorous ``delta`` and
``optden.engine.precision.certify`` re-scores or falls back to the float64 torch pass.
"""
from __future__ import annotations

import math

import torch

from ... import _ext
from ...data.storage import STORAGE_DTYPES
from .. import dispatch
from ..dispatch import Backend
from ..partial import Partial
from .gpu_pass import plan_splits, run_pass


class CudaBackend(Backend):
    name = "cuda"
    priority = 15  # above the C++ cpu backend; below the tensor-core Triton pass
    description = "optden._C CUDA kernels (fp32 FMA, certified); needs a CUDA build of the extension"
    devices = ("cuda",)
    max_d = 1 << 20
    max_d_why = "the fp32 error bound covers"

    def availability(self) -> list[str]:
        C = _ext.C
        if C is None:
            return [f"optden._C is not available ({_ext.error})"]
        if not hasattr(C, "cuda_dense_partial"):
            return ["optden._C was built without CUDA (reinstall with nvcc and a CUDA build of torch, or OPTDEN_CUDA=1)"]
        if torch.version.cuda is None:
            return ["this torch build has no CUDA support"]
        if not torch.cuda.is_available():
            return ["no CUDA device"]
        try:
            if C.cuda_device_count() < 1:
                return ["the extension's CUDA runtime sees no device"]
        except RuntimeError as exc:  # e.g. a driver older than the runtime it was built with
            return [str(exc)]
        return []

    def partial(self, v: torch.Tensor, coef: torch.Tensor, source, k: int) -> Partial:
        """See ``Backend.partial``. v: (N, d) float64 on a CUDA device, coef: (N,) float64."""
        C = _ext.C
        n, d = v.shape
        dev = v.device
        code = STORAGE_DTYPES[source.dtype].code
        centered = source.dtype == "uint8"
        v32 = v.to(torch.float32).contiguous()
        resid = (v - v32.double()).norm(dim=1)
        center32 = source.center.to(dev, torch.float32).contiguous()
        coef32 = coef.to(torch.float32).contiguous()
        qn = int(C.CUDA_QUERIES_PER_BLOCK)
        tile = int(C.CUDA_TILE_ROWS)
        target = 4 * torch.cuda.get_device_properties(dev).multi_processor_count
        n_q = math.ceil(n / qn)
        index = dev.index if dev.index is not None else torch.cuda.current_device()

        def kernel(x, csq32, rps):
            if x.stride(1) != 1:
                x = x.contiguous()
            b = x.shape[0]
            S = math.ceil(b / rps)
            logits = torch.empty(n, b, dtype=torch.float32, device=dev)
            m = torch.empty(S, n, dtype=torch.float32, device=dev)
            s = torch.empty(S, n, dtype=torch.float32, device=dev)
            acc = torch.empty(S, n, d, dtype=torch.float32, device=dev)
            stream = torch.cuda.current_stream(dev).cuda_stream
            C.cuda_dense_partial(
                code, x.data_ptr(), x.stride(0), center32.data_ptr(), csq32.data_ptr(), v32.data_ptr(), v32.stride(0),
                coef32.data_ptr(), logits.data_ptr(), logits.stride(0), m.data_ptr(), s.data_ptr(), acc.data_ptr(),
                n, b, d, rps, centered, index, stream,
            )
            return logits, m, s, acc

        return run_pass(
            kernel, source, v, coef, k,
            pieces=1,
            centered=centered,
            tiles_per_split=lambda rps: math.ceil(rps / tile),
            block_m_max=tile,
            resid=resid,
            rows_per_split_fn=lambda rows: plan_splits(rows, n, d, n_q, target),
        )


dispatch.register("cuda", CudaBackend)
