"""Sparse AdamW on a GPU: the Triton step (kernels/sparse.py) against the copy bandwidth and torch's fused dense
AdamW, over the Qwen2.5-0.5B parameter count, in one run. Without a CUDA GPU it says so and exits 0.

    python bench/sparse_gpu.py [--shape qwen2.5-0.5b] [--sparsities 90,95,97.5,99,99.75] [--reps 30]

The weights are one flat fp32 vector (the parameter count of --shape) with a random gradient; the masks are
uniform at each sparsity, as sorted index lists (int32: the vector has fewer than 2^31 entries). Rows:

  copy        dst.copy_(src) over the vector: the bandwidth ceiling, bytes read + written
  dense       torch.optim.AdamW(fused=True) over the vector: p, g, m, v read, p, m, v written
  sparse      kernels.sparse.sparse_adamw_ over the mask. Its touched bytes: per masked entry the index (4),
              g and p read (8), p written (4), the compact m and v read and written (16). Reported against
              the copy bandwidth, with the launch shape (entries per program, warps) that ran fastest.
              Memory moves in 32-byte sectors, so a scattered entry costs a sector of p and of g; the
              "sector" column counts the distinct sectors of p (read and written) and g the mask touches.

Medians of --reps steps timed with CUDA events, after warm-up; the kernel's result is checked bit for bit
against the torch reference on the same inputs first.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

SHAPES = (256, 512, 1024, 2048, 4096)
WARPS = (4, 8, 16)


def median_ms(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def parameter_count(shape: str) -> int:
    from pcpc.exporters.qwen2 import make_config, param_shapes

    return sum(math.prod(s) for s in param_shapes(make_config(shape)).values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="qwen2.5-0.5b")
    ap.add_argument("--sparsities", default="90,95,97.5,99,99.75")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # a dry run of the script elsewhere
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench/sparse_gpu.py: skipped, no CUDA GPU")
        return
    from pcpc.kernels import sparse

    dev = torch.device(a.device)
    n = parameter_count(a.shape)
    print(f"bench/sparse_gpu.py  {time.strftime('%Y-%m-%d %H:%M')}  {torch.cuda.get_device_name()}; "
          f"torch {torch.__version__}; {a.shape}: {n:,} fp32 weights; medians of {a.reps} steps")
    gen = torch.Generator(device=dev).manual_seed(0)
    p = torch.randn(n, device=dev, generator=gen) * 0.02
    g = torch.randn(n, device=dev, generator=gen) * 1e-3
    out = {"device": torch.cuda.get_device_name(), "params": n, "sparse": {}}

    dst = torch.empty_like(p)
    copy_ms = median_ms(lambda: dst.copy_(p), a.reps)
    bw = 8 * n / copy_ms / 1e6  # GB/s
    del dst
    out["copy_gbps"] = bw
    print(f"\ncopy            {copy_ms:8.3f} ms  {bw:7.0f} GB/s (read + written)")

    dense_p = p.clone().requires_grad_(True)
    dense_p.grad = g
    opt = torch.optim.AdamW([dense_p], lr=1e-5, weight_decay=0.1, fused=True)
    dense_ms = median_ms(opt.step, a.reps)
    out["dense_ms"] = dense_ms
    print(f"dense fused AdamW {dense_ms:6.3f} ms  {28 * n / dense_ms / 1e6:7.0f} GB/s")
    del opt, dense_p
    torch.cuda.empty_cache()

    hyper = dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
    s = sparse.adamw_scalars(7, 1e-5, hyper["beta1"], hyper["beta2"], hyper["weight_decay"])
    print(f"\n{'sparsity':>9} {'nnz':>12} {'ms':>8} {'vs dense':>9} {'GB/s':>7} {'of copy':>8} {'sector GB/s':>12} "
          f"{'of copy':>8}  launch")
    for sp in [float(x) for x in a.sparsities.split(",") if x]:
        keep = torch.rand(n, device=dev, generator=gen) >= sp / 100
        idx = keep.nonzero().squeeze(1).to(torch.int32)
        del keep
        nnz = idx.numel()
        m = torch.rand(nnz, device=dev, generator=gen) * 1e-4
        v = torch.rand(nnz, device=dev, generator=gen) * 1e-8

        # correctness first: one step of the kernel against the torch reference, bit for bit
        want = [t.clone() for t in (p, m, v)]
        sparse.sparse_adamw_reference(*want[:1], g, idx.long(), *want[1:], step=7, lr=1e-5, **hyper)
        got = [t.clone() for t in (p, m, v)]
        sparse.sparse_adamw_(got[0], g, idx, got[1], got[2], step=7, lr=1e-5, **hyper)
        differ = {k: int((x != y).sum()) for k, x, y in zip("pmv", got, want)}
        if any(differ.values()):
            raise SystemExit(f"{sp}%: the Triton step differs from the reference in {differ} entries")
        del want, got

        work = [t.clone() for t in (p, m, v)]
        best = None
        for block in SHAPES:
            for warps in WARPS:
                if warps * 32 > block:
                    continue
                ms = median_ms(lambda: sparse._launch_adamw(work[0], g, idx, work[1], work[2], hyper["beta1"],
                                                            hyper["beta2"], hyper["eps"], s, block, warps), a.reps)
                if best is None or ms < best[0]:
                    best = (ms, block, warps)
        default_ms = median_ms(lambda: sparse.sparse_adamw_(work[0], g, idx, work[1], work[2], 7, 1e-5, **hyper),
                               a.reps)
        sectors = torch.unique_consecutive(torch.div(idx, 8, rounding_mode="floor")).numel()
        ms, block, warps = best
        touched = 32 * nnz
        sector_bytes = 20 * nnz + 3 * 32 * sectors  # the index, m and v (compact); p read + written, g read by sector
        r = {"nnz": nnz, "ms": ms, "default_ms": default_ms, "block": block, "warps": warps,
             "gbps": touched / ms / 1e6, "sector_gbps": sector_bytes / ms / 1e6, "sectors": sectors}
        out["sparse"][str(sp)] = r
        print(f"{sp:8.2f}% {nnz:12,} {ms:8.3f} {dense_ms / ms:8.1f}x {r['gbps']:7.0f} {r['gbps'] / bw:7.0%} "
              f"{r['sector_gbps']:12.0f} {r['sector_gbps'] / bw:7.0%}  {block} x {warps} warps "
              f"(default {sparse.BLOCK} x {sparse.WARPS}: {default_ms:.3f} ms)")
        del work, idx, m, v
        torch.cuda.empty_cache()
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
