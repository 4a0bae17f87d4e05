"""Channel pruning, measured: ONNX Runtime CPU latency (level ``all``) before and after ``prune.channels``.

usage: python benchmarks/prune_latency.py [--threads 2] [--seconds 2] [--batch-sizes 1,8] [--models digits_cnn,...]

Models (random init with seed 0: latency does not depend on the weights, and L1 importance still
picks a channel count per layer the same way):
  digits_cnn     ``compress.zoo:digits_cnn`` on 1x8x8 inputs;
  mobilenet_v2   torchvision MobileNetV2 (num_classes 10) at width 1.0 and 0.5 on 3x32x32 inputs.
Each is pruned with ``compress.prune.channels(model, example, macs_reduction=2.0)`` three ways:
the default (``round_to`` 8), ``round_to=1`` (no rounding) and, for reference, ``scope="global"``
with the default rounding. Every variant and the unpruned model are exported by ``export_onnx``
(opset 13) and timed in ONNX Runtime (CPUExecutionProvider, level ``all``, thread spinning off,
``--threads`` intra-op threads) by ``compress.prune.latency.measure``: unpruned and pruned take turns
run by run, the median of each, about ``--seconds`` per model pair. Ratios are from one run.
Target: the default variant is never slower than unpruned (speedup >= 1 at every batch size).
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
import warnings
from pathlib import Path

import onnxruntime as ort
import torch
from torch import nn

import compress
import compress.prune
from compress.profile import count_macs
from compress.prune.latency import export_for_timing, measure

MODELS = {
    "digits_cnn": (lambda: compress.build("compress.zoo:digits_cnn", {}), (1, 8, 8)),
    "mobilenet_v2": (lambda: compress.build("torchvision.models:mobilenet_v2", {"num_classes": 10}), (3, 32, 32)),
    "mobilenet_v2_w0.5": (lambda: compress.build("torchvision.models:mobilenet_v2",
                                                 {"num_classes": 10, "width_mult": 0.5}), (3, 32, 32)),
}
VARIANTS = {"default (round_to 8)": {}, "round_to 1": {"round_to": 1}, "global, round_to 8": {"scope": "global"}}


def widths(model: nn.Module) -> str:
    counts = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups == 1]
    off = sum(c % 8 != 0 for c in counts)
    return f"{off}/{len(counts)} convs not a multiple of 8"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=2.0, help="timing per unpruned/pruned pair")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--models", default=",".join(MODELS))
    args = parser.parse_args()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    print(f"onnxruntime {ort.__version__}, torch {torch.__version__}, CPUExecutionProvider, level all, "
          f"intra_op threads {args.threads}, spinning off; load average at start {os.getloadavg()[0]:.2f}")
    header = (f"{'model':18s} {'variant':20s} {'MACs red':>8s} {'bs':>3s} {'unpruned ms':>11s} {'pruned ms':>10s} "
              f"{'speedup':>8s}  channels")
    print(header)
    worst_default = float("inf")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            build, shape = MODELS[name]
            torch.manual_seed(0)
            base = build().eval()
            example = torch.zeros(1, *shape)
            macs0 = count_macs(base, example)
            before = export_for_timing(base, example, Path(tmp) / f"{name}.onnx")
            for variant, kwargs in VARIANTS.items():
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    pruned = compress.prune.channels(copy.deepcopy(base), example, macs_reduction=2.0, **kwargs).eval()
                after = export_for_timing(pruned, example, Path(tmp) / f"{name}-{len(kwargs)}{variant[:3]}.onnx")
                figures = measure(before, after, example, batch_sizes, threads=args.threads, seconds=args.seconds)
                for f in figures:
                    print(f"{name:18s} {variant:20s} {macs0 / count_macs(pruned, example):7.2f}x {f.batch_size:3d} "
                          f"{f.before:11.3f} {f.after:10.3f} {f.speedup:7.2f}x  {widths(pruned)}")
                    if variant.startswith("default"):
                        worst_default = min(worst_default, f.speedup)
                for w in caught:
                    print(f"{'':18s} warning: {w.message}")
    print(f"\nworst speedup of the default configuration: {worst_default:.2f}x (target >= 1.00)")
    print(f"(benchmark wall time {time.perf_counter() - start:.0f} s, load average at end {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()
