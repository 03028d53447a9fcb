"""Compile every GEMM-pass kernel configuration for a GPU target and report its resources.

No GPU is needed: ``triton.compile`` lowers each configuration of
``optden.kernels.dense_gemm`` (``LOGITS_CONFIGS`` with 2 and 3 query pieces,
``WSUM_CONFIGS``, the query split) to a cubin for the target (default sm_90, H100), as a launch would
specialize it: pointers, strides and d divisible by 16 ("aligned", d = 3072 or 12288),
or d and the row stride not ("odd", e.g. d = 3075). ``cuobjdump -res-usage`` (Triton's
own copy, else the CUDA toolkit's) gives registers and stack (spills); Triton's metadata
gives shared memory. One line per configuration:

    KERNEL <kernel> <config> P=<pieces> <aligned|odd> regs=<n> stack=<bytes> local=<bytes> smem=<bytes> wgmma=<n>

    python bench/gemm_compile_report.py [--arch 90] [--json out.json]

Exit status 1 when a configuration fails to compile, or an aligned one spills, uses more
than 255 registers or more shared memory than the target allows (227 KiB on sm_90).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the checkout, when optden is not installed

#: Largest dynamic shared memory of one block, per compute capability (bytes).
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


def cuobjdump() -> str | None:
    import triton

    own = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if os.path.isfile(own):
        return own
    return shutil.which("cuobjdump") or next((p for p in ("/usr/local/cuda/bin/cuobjdump",) if os.path.isfile(p)), None)


def _resources(cubin: bytes, tool: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        text = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True, timeout=120).stdout
    finally:
        os.unlink(path)
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", text)
    if not m:
        raise RuntimeError(f"cuobjdump -res-usage gave no resource line:\n{text}")
    return {"regs": int(m.group(1)), "stack": int(m.group(2)), "local": int(m.group(4))}


def compile_all(arch: int = 90) -> list[dict]:
    """Compile every configuration; returns one dict per (kernel, config, pieces, alignment)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from optden.kernels import dense_gemm as K

    tool = cuobjdump()
    target = GPUTarget("cuda", arch, 32)
    jobs = []
    lf = K._logits_kernel
    for name, (bm, bn, bd, warps, stages, max_p) in K.LOGITS_CONFIGS.items():
        for p in range(2, max_p + 1):
            sig = {"X": "*u8", "QP": "*i8", "SC": "*fp32", "CSQ": "*fp32", "COEF": "*fp32", "LOGITS": "*fp32",
                   "TMAX": "*fp32", "TSUM": "*fp32"}
            const = dict(PIECES=p, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, GROUP=K.GROUP_M)
            aligned = ["X", "stride_x", "QP", "stride_qp", "stride_qn", "SC", "CSQ", "COEF", "LOGITS", "stride_l",
                       "TMAX", "TSUM", "D"]
            jobs.append(("logits", lf, name, p, sig, const, aligned, warps, stages))
    wf = K._wsum_kernel
    for name, (bn, bk, bd, warps, stages) in K.WSUM_CONFIGS.items():
        sig = {"X": "*u8", "LOGITS": "*fp32", "MREF": "*fp32", "ACC": "*fp32", "SOUT": "*fp32"}
        const = dict(BF16_DOT=True, BLOCK_N=bn, BLOCK_K=bk, BLOCK_D=bd)
        aligned = ["X", "stride_x", "LOGITS", "stride_l", "MREF", "ACC", "stride_as", "stride_an", "SOUT", "D"]
        jobs.append(("wsum", wf, name, 0, sig, const, aligned, warps, stages))
    sf = K._split_kernel
    for p in (2, 3):
        sig = {"V": "*fp64", "C128": "*fp64", "QP": "*i8", "SC": "*fp32", "STATS": "*fp64"}
        const = dict(PIECES=p, BLOCK_D=K.SPLIT_BLOCK_D)
        aligned = ["V", "stride_v", "C128", "QP", "stride_qp", "stride_qn", "SC", "STATS", "D"]
        jobs.append(("split", sf, f"bd{K.SPLIT_BLOCK_D}", p, sig, const, aligned, K.SPLIT_WARPS, 2))
    out = []
    for kernel, fn, name, p, ptrs, const, aligned, warps, stages in jobs:
        names = fn.arg_names
        sig = {a: ptrs.get(a, "constexpr" if a in const else "i32") for a in names}
        for align in ("aligned", "odd"):
            odd = ("stride_x", "stride_v", "stride_qn", "stride_qp", "D")
            div = aligned if align == "aligned" else [a for a in aligned if a not in odd]
            attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in div}
            src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()},
                            attrs=attrs)
            row = {"kernel": kernel, "config": name, "pieces": p, "align": align, "warps": warps, "stages": stages}
            try:
                c = triton.compile(src, target=target, options={"num_warps": warps, "num_stages": stages})
                row.update(smem=int(c.metadata.shared), wgmma=c.asm["ptx"].count("wgmma.mma_async"),
                           mma_sync=c.asm["ptx"].count("mma.sync"))
                row.update(_resources(c.asm["cubin"], tool) if tool else {"regs": -1, "stack": -1, "local": -1})
            except Exception as exc:  # report every configuration, then fail
                row.update(error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            out.append(row)
    return out


def problems(rows: list[dict], arch: int) -> list[str]:
    bad = []
    for r in rows:
        tag = f"{r['kernel']} {r['config']} P={r['pieces']} {r['align']}"
        if "error" in r:
            bad.append(f"{tag}: {r['error']}")
            continue
        if r["smem"] > SMEM_LIMIT.get(arch, SMEM_LIMIT[90]):
            bad.append(f"{tag}: {r['smem']} bytes of shared memory")
        if r["align"] == "aligned" and r["regs"] >= 0 and (r["regs"] > 255 or r["stack"] or r["local"]):
            bad.append(f"{tag}: {r['regs']} registers, stack {r['stack']}, local {r['local']} (spills)")
    return bad


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability to compile for (90: H100)")
    ap.add_argument("--json", default="", help="also write the rows as JSON")
    args = ap.parse_args(argv)
    import triton

    rows = compile_all(args.arch)
    print(f"triton {triton.__version__}, sm_{args.arch}, cuobjdump: {cuobjdump() or 'not found (registers unknown)'}")
    for r in rows:
        if "error" in r:
            print(f"KERNEL {r['kernel']} {r['config']} P={r['pieces']} {r['align']} ERROR {r['error']}")
        else:
            print(f"KERNEL {r['kernel']:<6} {r['config']:<5} P={r['pieces']} {r['align']:<7} warps={r['warps']} "
                  f"stages={r['stages']} regs={r['regs']} stack={r['stack']} local={r['local']} smem={r['smem']} "
                  f"wgmma={r['wgmma']} mma.sync={r['mma_sync']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    bad = problems(rows, args.arch)
    for b in bad:
        print("PROBLEM", b)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
