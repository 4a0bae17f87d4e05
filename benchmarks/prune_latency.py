"""Channel pruning, measured: ONNX Runtime CPU latency of resnet18 before and after ``prune.channels``.

usage: python benchmarks/prune_latency.py [--threads 2] [--iters 40] [--level extended|all] [--no-macs-row]

torchvision resnet18 (num_classes 10, random init with seed 0: latency does not depend on the
weights, and with random weights L1 importance still picks a channel count per layer the same way)
at 224x224, batch 8, FP32:
  (1) unpruned.
  (2) ``compress.prune.channels(model, example, ratio=0.5)`` (l1, local: every prunable group keeps
      half its channels; the head keeps its 10 outputs).
  (3) ``compress.prune.channels(model, example, macs_reduction=2.0)`` (skip with --no-macs-row).
Each is exported by ``export_onnx`` (opset 13) and built by ``build_engine`` with the same session
options (CPUExecutionProvider, ``--threads`` intra-op threads, ``--level`` graph optimisation). p50
(and min) over ``--iters`` runs after 5 warm-up runs; the engines take turns run by run, so background
load hits all alike. Each engine's output is checked against its torch model. MACs per sample from
``compress.profile.count_macs`` (Conv/Linear).
Target: unpruned / ratio-0.5 p50 latency >= 1.6x.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

from timing import interleaved_ms  # noqa: E402

import compress  # noqa: E402
import compress.prune  # noqa: E402
from compress.export.onnx import export_onnx  # noqa: E402
from compress.export.onnxruntime import Optimization, OrtEngine, build_engine  # noqa: E402
from compress.models import count_params  # noqa: E402
from compress.profile import count_macs  # noqa: E402


def timed_p50(engines: dict[str, OrtEngine], x: torch.Tensor, iters: int) -> dict[str, tuple[float, float]]:
    """``{name: (p50 ms, min ms)}`` after 5 warm-up runs; the engines take turns run by run."""
    times = interleaved_ms({name: (lambda e=engine: e(x)) for name, engine in engines.items()}, iters)
    return {name: (float(np.percentile(ts, 50)), min(ts)) for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--level", choices=[o.value for o in Optimization], default="extended")
    parser.add_argument("--no-macs-row", action="store_true", help="skip the macs_reduction=2.0 variant")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    print(f"onnxruntime {ort.__version__}, CPUExecutionProvider, intra_op threads {args.threads}, "
          f"graph optimisation {args.level}, load average at start {os.getloadavg()[0]:.2f}")
    torch.manual_seed(0)
    base = compress.build("torchvision.models:resnet18", {"num_classes": 10}).eval()
    example = torch.zeros(1, 3, 224, 224)
    x = torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(0))

    models: dict[str, nn.Module] = {"unpruned": base}
    prune_s: dict[str, float] = {}
    variants = {"ratio 0.5": {"ratio": 0.5}}
    if not args.no_macs_row:
        variants["macs_reduction 2.0"] = {"macs_reduction": 2.0}
    for name, kwargs in variants.items():
        t0 = time.perf_counter()
        models[name] = compress.prune.channels(copy.deepcopy(base), example, **kwargs).eval()
        prune_s[name] = time.perf_counter() - t0

    macs0 = count_macs(base, example)
    engines: dict[str, OrtEngine] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in models.items():
            path = Path(tmp) / f"{name.replace(' ', '_')}.onnx"
            export_onnx(copy.deepcopy(model), example, path, opset=13)
            engines[name] = build_engine(path, path.with_suffix(".engine.onnx"), threads=args.threads,
                                         level=Optimization(args.level))
            with torch.no_grad():
                diff = float((engines[name](x[:2]) - model(x[:2])).abs().max())
            print(f"  {name:20s}: exported and built; max |ORT - torch| on 2 images = {diff:.2e}"
                  + (f"; prune.channels took {prune_s[name]:.1f} s" if name in prune_s else ""))
        p50 = timed_p50(engines, x, args.iters)

    print(f"\nresnet18 224x224 batch 8 FP32, ONNX Runtime CPU, p50 over {args.iters} iters (engines interleaved):")
    print(f"{'variant':20s} {'params':>11s} {'MACs/sample':>14s} {'MACs red':>9s} {'p50 ms':>9s} {'min ms':>9s} "
          f"{'speedup':>8s}")
    base_ms = p50["unpruned"][0]
    for name, model in models.items():
        macs = count_macs(model, example)
        ms, fastest = p50[name]
        print(f"{name:20s} {count_params(model):11,d} {macs:14,d} {macs0 / macs:8.3f}x {ms:9.2f} {fastest:9.2f} "
              f"{base_ms / ms:7.3f}x")
    print()
    for name in variants:
        macs = count_macs(models[name], example)
        target = " (target >= 1.6)" if name == "ratio 0.5" else ""
        print(f"unpruned / {name} p50 latency = {base_ms / p50[name][0]:.3f}{target}; "
              f"MACs reduction {macs0 / macs:.3f}x")
    print(f"(benchmark wall time {time.perf_counter() - start:.0f} s, load average at end {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()
