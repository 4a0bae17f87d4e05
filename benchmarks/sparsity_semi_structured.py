"""2:4 semi-structured sparse ``F.linear`` vs dense on sparse tensor cores: fp16 latency and agreement.

usage: python benchmarks/sparsity_semi_structured.py [--shapes 64x4096x4096 1024x4096x4096 ...] [--iters 100]

Needs a CUDA GPU with sparse tensor cores (sm80+); elsewhere it prints why
(``compress.sparsity.why_unavailable()``) and exits 0. Per shape ``TOKENSxINxOUT``: x ``[tokens, in]`` and a
weight ``[out, in]`` in fp16 (randn, seed 0), the weight made 2:4 with ``mask_2to4``; the dense run uses that
same 2:4 weight as an ordinary tensor, the sparse run ``torch.sparse.to_sparse_semi_structured`` of it, so
both compute the same product. Time per call: median of ``--iters`` CUDA-event-timed samples of ``--reps``
back-to-back calls, after ``--warmup`` calls, dense and sparse alternating in quarters. Agreement: max abs
difference of the outputs relative to the max abs dense output (fp16 accumulation order differs, so a few
1e-3 is expected).
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
import torch.nn.functional as F
from timing import cuda_ms

from compress.sparsity import mask_2to4, why_unavailable

SHAPES = ["64x4096x4096", "1024x4096x4096", "4096x4096x11008", "8192x8192x8192"]


def bench_shape(tokens: int, cin: int, cout: int, iters: int, reps: int, warmup: int) -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(tokens, cin, device="cuda", dtype=torch.float16, generator=gen)
    w = torch.randn(cout, cin, device="cuda", dtype=torch.float16, generator=gen)
    w = w * mask_2to4(w)
    try:
        ws = torch.sparse.to_sparse_semi_structured(w)
        sparse_out = F.linear(x, ws)
    except (RuntimeError, ValueError) as exc:
        print(f"  {tokens}x{cin}x{cout}: the semi-structured kernel refuses it: {str(exc).splitlines()[0]}")
        return
    dense_out = F.linear(x, w)
    rel = float((sparse_out.float() - dense_out.float()).abs().max() / dense_out.float().abs().max())
    dense_t, sparse_t = [], []
    for _ in range(4):  # alternating quarters, so drift (clocks, heat) hits both alike
        dense_t += cuda_ms(lambda: F.linear(x, w), max(iters // 4, 1), reps, warmup)
        sparse_t += cuda_ms(lambda: F.linear(x, ws), max(iters // 4, 1), reps, warmup)
    d, s = statistics.median(dense_t), statistics.median(sparse_t)
    tflops = 2 * tokens * cin * cout / 1e9  # / ms -> TFLOP/s
    backend = type(ws).__name__.replace("SparseSemiStructuredTensor", "")  # CUSPARSELT or CUTLASS
    print(f"  {f'{tokens}x{cin}x{cout}':<18} {backend:<10} {d:9.4f} {s:9.4f} {d / s:8.2f}x {tflops / d:10.1f} "
          f"{tflops / s:10.1f} {rel:10.2e}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=SHAPES, help="TOKENSxINxOUT")
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--reps", type=int, default=10, help="back-to-back calls per timed sample")
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args()
    why = why_unavailable()
    if why is not None:
        print(f"skipped: {why}")
        return 0
    sm = "".join(map(str, torch.cuda.get_device_capability()))
    print(f"{torch.cuda.get_device_name()} (sm{sm}), torch {torch.__version__}; fp16, median of {args.iters} "
          f"CUDA-event samples of {args.reps} calls after warm-up")
    print(f"  {'tokens x in x out':<18} {'backend':<10} {'dense ms':>9} {'2:4 ms':>9} {'speedup':>9} "
          f"{'dense TF/s':>10} {'2:4 TF/s':>10} {'rel. diff':>10}")
    with torch.no_grad():
        for shape in args.shapes:
            tokens, cin, cout = (int(v) for v in shape.lower().split("x"))
            bench_shape(tokens, cin, cout, args.iters, args.reps, args.warmup)
    return 0


if __name__ == "__main__":
    sys.exit(main())
