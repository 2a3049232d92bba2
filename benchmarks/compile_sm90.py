"""Compile every configuration of the fast kernels for sm_90 on a machine without a GPU.

Run: ``python benchmarks/compile_sm90.py [--head-dims 128 256] [--dtypes bfloat16]``.

Triton compiles for a target it is told about; only loading a kernel needs the device.
This script tells Triton's JIT that the current device is an sm_90 GPU, runs the
launchers of ``fast/attend.py`` and ``fast/cache.py`` on ``meta`` tensors (shapes and
dtypes, no data) with every launch turned into a compile-only warm-up, and reports for
each compiled kernel what the H100 / H200 would check when loading it: the shared memory
it needs against the hardware limit (232,448 bytes per block on sm_90), and the registers
and spill bytes that ``ptxas -v`` reports for that kernel's own PTX. It exits non-zero
when some configuration would not load.

A configuration is (function, head dim, dtype, block size, GQA group); the plans are
those :func:`lazyattention.fast.plan.plan` chooses on a 132-SM device. Triton's cache
keeps compiled kernels, so a second run only reports.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.jit import JITFunction

SM90_SHARED_LIMIT = 232_448
SMS = 132
FUNCTIONS = ("lazy_prefill", "raw_prefill", "eager_attention", "lazy_decode", "raw_decode", "write_kv", "shared_decode")
META = torch.device("meta")


class _Sm90Driver:
    """Just enough of Triton's active driver for compiling: the target and a device id."""

    def get_current_target(self):
        return GPUTarget("cuda", 90, 64)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


def _compile_only(self, *args, grid, warmup, **kwargs):
    return _run(self, *args, grid=grid, warmup=True, **kwargs)


_run = JITFunction.run


def _layout(decode: bool, block_size: int, group: int):
    from lazyattention.reference import Layout, Placement, RequestLayout

    own, queries = (130, 1) if decode else (130, 100)
    seg = Placement(tuple(range(3)), 3 * block_size, 0)
    start = 3 * block_size
    own_blocks = tuple(range(3, 3 + triton.cdiv(own, block_size)))
    return Layout([RequestLayout((seg,), Placement(own_blocks, own, start, start), queries)], block_size)


def _own(r: int, block_size: int):
    """Request ``r``'s own tokens: 130, after the segment, in blocks of their own."""
    from lazyattention.reference import Placement

    blocks = triton.cdiv(130, block_size)
    start = 3 * block_size + 7 * r
    return Placement(tuple(range(3 + r * blocks, 3 + (r + 1) * blocks)), 130, start, start)


def configure(function: str, head_dim: int, dtype: torch.dtype, block_size: int, group: int) -> None:
    """Run ``function``'s launchers for one configuration (compile-only)."""
    from lazyattention.fast import attend, cache
    from lazyattention.fast.rope import rope_tables
    from lazyattention.reference import Layout, RequestLayout, RopeConfig

    kv_heads = 2
    heads = kv_heads * group
    dp = max(16, triton.next_power_of_2(head_dim))
    rope = RopeConfig(head_dim=head_dim)
    tables = rope_tables(rope, dp, torch.device("cpu"))
    tables = type(tables)(*(t.to(META) for t in tables))
    decode = function.endswith("decode")
    layout = _layout(decode, block_size, group)
    n = 16 if function != "shared_decode" else 3 + 3 * triton.cdiv(130, block_size)
    k_cache = torch.empty((n, block_size, kv_heads, head_dim), dtype=dtype, device=META)
    v_cache = torch.empty_like(k_cache)
    if function == "write_kv":
        t = 40
        k = torch.empty((t, kv_heads, head_dim), dtype=dtype, device=META)
        slots = torch.empty((t,), dtype=torch.int64, device=META)
        cache.scatter_kv(k, k, k_cache, v_cache, slots, slots, tables)
        cache.scatter_kv(k, k, k_cache, v_cache, slots, slots, None)
        return
    if function == "shared_decode":  # three requests sharing the segment, each at its own offset
        from lazyattention.fast import shared

        reqs = [RequestLayout(layout.requests[0].segments, _own(r, block_size), 1) for r in range(3)]
        sharing = shared.plan_sharing(Layout(reqs, block_size))
        q = torch.empty((3, heads, head_dim), dtype=dtype, device=META)
        shared.attend_shared(q, k_cache, v_cache, sharing, tables, 0.1)
        return
    meta = layout.metadata(META)
    max_q = max(r.num_queries for r in layout.requests)
    q = torch.empty((layout.num_queries, heads, head_dim), dtype=dtype, device=META)
    mode = {"lazy": attend.LAZY, "raw": attend.RAW, "eager": attend.LAZY}[function.split("_")[0]]
    if function == "eager_attention":
        k_copy, v_copy, meta = cache.materialise(k_cache, v_cache, meta, tables, torch.float32)
        attend.attend(q.float(), k_copy, v_copy, meta, tables, max_q, 0.1, mode, False, True)
    else:
        attend.attend(q, k_cache, v_cache, meta, tables, max_q, 0.1, mode, decode, True)
        if function == "lazy_prefill":
            attend.attend(q, k_cache, v_cache, meta, tables, max_q, 0.1, attend.NONE, decode, True)


def compile_all(configs) -> list[dict]:
    """Compile ``configs`` and return one report row per distinct compiled kernel."""
    from lazyattention.fast import plan

    rows, seen = [], set()
    driver.set_active(_Sm90Driver())
    JITFunction.run = _compile_only
    plan.multiprocessors = lambda device: SMS
    try:
        for i, cfg in enumerate(configs):
            error = None
            with contextlib.redirect_stdout(io.StringIO()):
                try:
                    configure(*cfg)
                except Exception as exc:  # reported, and the exit status says so
                    error = f"{type(exc).__name__}: {str(exc)[:300]}"
            for fn in _kernels():
                for key, kernel in fn.device_caches[0][0].items():
                    if (fn.fn.__name__, key) in seen:
                        continue
                    seen.add((fn.fn.__name__, key))
                    rows.append({"config": cfg, "kernel": fn.fn.__name__, "shared": kernel.metadata.shared,
                                 "warps": kernel.metadata.num_warps, "stages": kernel.metadata.num_stages,
                                 **ptxas_usage(kernel.asm["ptx"])})  # fmt: skip
            if error:
                rows.append({"config": cfg, "kernel": "?", "error": error})
            print(f"[{i + 1}/{len(configs)}] {_name(cfg)}" + (f"  ERROR {error}" if error else ""), file=sys.stderr)
    finally:
        JITFunction.run = _run

    return rows


def ptxas_usage(ptx: str) -> dict:
    """``{"regs", "spills"}`` of one kernel: its PTX assembled for sm_90a by Triton's ptxas
    with ``-v`` (each compiled kernel on its own, so the figures are that kernel's)."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as src:
        src.write(ptx)
        src.flush()
        log = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name=sm_90a", src.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr  # fmt: skip
    regs = re.findall(r"Used (\d+) registers", log)
    spills = re.findall(r"(\d+) bytes spill stores", log)
    return {"regs": max(map(int, regs), default=0), "spills": max(map(int, spills), default=0)}


def _kernels():
    from lazyattention.fast import cache, kernels, merge, shared

    return [kernels._attention_kernel, kernels._query_kernel, merge._merge_kernel,
            cache.write_kv_kernel, cache._materialise_kernel, shared._shared_kernel]  # fmt: skip


def _name(cfg) -> str:
    function, d, dtype, s, g = cfg
    return f"{function} D={d} {str(dtype).removeprefix('torch.')} S={s} G={g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--functions", nargs="+", default=list(FUNCTIONS), choices=FUNCTIONS)
    parser.add_argument("--head-dims", nargs="+", type=int, default=[64, 80, 96, 128, 256])
    parser.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16", "float32"])
    parser.add_argument("--block-sizes", nargs="+", type=int, default=[16, 64, 128])
    parser.add_argument("--groups", nargs="+", type=int, default=[4])
    args = parser.parse_args()
    dtypes = [getattr(torch, d) for d in args.dtypes]
    configs = list(itertools.product(args.functions, args.head_dims, dtypes, args.block_sizes, args.groups))
    rows = compile_all(configs)
    bad = 0
    for r in rows:
        if "error" in r:
            bad += 1
            print(f"ERROR {_name(r['config'])}: {r['error']}")
            continue
        over = r["shared"] > SM90_SHARED_LIMIT
        bad += over
        print(f"{'OVER ' if over else 'ok   '}{r['kernel']:20} shared {r['shared']:6d} regs {r['regs']:3d} "
              f"spills {r['spills']:4d}  ({_name(r['config'])})")  # fmt: skip
    print(f"{len(rows)} kernels compiled for sm_90, {bad} would not load")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
