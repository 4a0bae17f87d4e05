"""Pruning to a latency target measured on the engine: achieved ratio, its spread, MACs reduction, search time.

usage: python benchmarks/prune_latency_target.py [--models resnet18 mobilenet_v2 densenet121] [--size 224]
                                                 [--batch-sizes 1 8] [--precisions fp32 int8] [--target 0.5]
                                                 [--candidates 6] [--repeats 5] [--rounds 5] [--threads N]
                                                 [--scope local|global]
                                                 [--json OUT.json]

Models: torchvision ``resnet18`` (residual), ``mobilenet_v2`` (depthwise, inverted residual) and
``densenet121`` (concatenation), random weights (seed 0): latency does not depend on the weights' values.
Each (model, batch size, precision) runs ``compress.prune.channels(model, x, latency=LatencyTarget(target,
batch_size, candidates, repeats, rounds))``: channel pruning (l1, local, round_to = the engine's multiple:
ONNX Runtime's MLAS NCHWc block, 16 on AVX-512 CPUs, else 8), each candidate exported and loaded into an
ONNX Runtime CPU session at level ``all`` (thread spinning off, the unpruned engine's session alongside)
and timed in ``repeats`` interleaved runs of ``rounds`` paired rounds. ``int8``: both engines are INT8
(Q/DQ, target onnxruntime) of copies max-calibrated on 32 random samples, as when a recipe quantizes after
pruning. Columns: the chosen candidate's measured latency ratio (median of the runs; min-max of the runs),
met (median <= target + half the runs' IQR), MACs reduction, candidates timed, wall time of the search
(exports, calibration, sessions and timing). No accuracy here: equal-latency accuracy against MACs-targeted
and Torch-Pruning pruning is ``benchmarks/prune_equal_latency.py``. ``--scope global`` ranks channels across
groups (finer steps where local scope moves a group only in large jumps, e.g. DenseNet's 32-channel growth convs).

Measured at 224 (2 shared cores, AVX-512 so round_to 16, target 0.5, defaults; more rows in docs/benchmarks.md):

    model         batch prec  scope   ratio  runs min-max  MACs/  wall s   load
    densenet121       1 fp32  local   0.371  0.310-0.418   3.84    617     4-6
    densenet121       1 int8  local   0.488  0.464-0.505   5.16    132     4-6
    densenet121       8 fp32  local   0.342  0.335-0.391   3.84    540     4-6
    densenet121       8 int8  local   0.449  0.448-0.449   3.84    535     2-4
    densenet121       8 fp32  global  0.495  0.485-0.530   2.42    135     2-4
    resnet18          1 int8  local   0.416  0.370-0.437   4.15     21     2-4
    mobilenet_v2      1 int8  local   0.499  0.463-0.543   5.64     20     2-4

All met. DenseNet with local scope lands well past the target (its growth convs keep 32 or 16 channels at
round_to 16, nothing between: the stage warns and suggests scope global); global scope lands on it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torchvision

import compress
from compress.prune import Engine, Int8, LatencyTarget
from compress.quant.spec import Target


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return getattr(torchvision.models, name)(num_classes=1000).eval()


def run(name: str, size: int, batch_size: int, precision: str, args: argparse.Namespace) -> dict:
    model = _model(name)
    x = torch.randn(2, 3, size, size)
    int8 = Int8([torch.randn(8, 3, size, size) for _ in range(4)], Target.onnxruntime) if precision == "int8" else None
    latency = LatencyTarget(target=args.target, batch_size=batch_size, threads=args.threads,
                            candidates=args.candidates, repeats=args.repeats, rounds=args.rounds)
    start = time.perf_counter()
    found = compress.prune.channels(model, x, latency=latency, engine=Engine(int8=int8), scope=args.scope)
    wall = time.perf_counter() - start
    report = found.to_report()
    return {"model": name, "size": size, "batch_size": batch_size, "precision": precision, "wall_s": round(wall, 1),
            "scope": args.scope,
            **{k: report[k] for k in ("target", "met", "latency_ratio", "spread", "noise", "macs_reduction",
                                      "timed", "candidates", "stopped", "ratio")},
            "round_to": report["engine"]["round_to"], "path": report["path"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2", "densenet121"])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--precisions", nargs="+", choices=["fp32", "int8"], default=["fp32", "int8"])
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--candidates", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--scope", choices=["local", "global"], default="local",
                        help="channel ranking per group (local) or across groups (global: finer steps on DenseNet)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    print(f"{'model':>13} {'size':>4} {'batch':>5} {'prec':>4} {'ratio':>6} {'runs min-max':>13} {'met':>3} "
          f"{'MACs/':>6} {'timed':>5} {'round_to':>8} {'wall s':>7}")
    for name in args.models:
        for bs in args.batch_sizes:
            for precision in args.precisions:
                r = run(name, args.size, bs, precision, args)
                rows.append(r)
                print(f"{name:>13} {args.size:>4} {bs:>5} {precision:>4} {r['latency_ratio']:>6.3f} "
                      f"{r['spread'][0]:>6.3f}-{r['spread'][1]:<6.3f} {'yes' if r['met'] else 'no':>3} "
                      f"{r['macs_reduction']:>6.2f} {r['timed']:>2}/{r['candidates']:<2} {r['round_to']:>8} "
                      f"{r['wall_s']:>7.1f}", flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
