"""Cost of a QAT train step against the same FP32 train step on the CPU.

usage: python benchmarks/qat_step.py [--steps 8] [--rounds 3] [--threads N]

One step = forward + cross-entropy + backward + SGD step (lr 1e-3, momentum 0.9), and for QAT also
``compress.quant.refresh_weight_amax`` (what ``compress.qat.QatCallback`` does after every step).
Models: resnet18 on digits at 32x32 RGB and digits_cnn on 8x8 digits, batch 64, tensorrt target,
activations calibrated with ``max`` on 512 train samples. Both models see the same batches, after
two warm-up steps; each batch runs through FP32 / QAT back to back so background load hits both alike. The step time is
the median over all timed steps (the minimum is printed too). Target: QAT / FP32 <= 1.5.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

import bench_models  # noqa: E402

from compress import ptq, quant  # noqa: E402

Batches = list[tuple[torch.Tensor, torch.Tensor]]


Step = Callable[[torch.Tensor, torch.Tensor], None]


def make_step(model: nn.Module, qat: bool) -> Step:
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    model.train()

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if qat:
            quant.refresh_weight_amax(model)

    return step


def interleaved_steps(variants: dict[str, Step], batches: Batches, rounds: int) -> dict[str, list[float]]:
    """Seconds per step of each variant; every batch runs through all variants back to back."""
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for x, y in batches:
            for key, step in variants.items():
                start = time.perf_counter()
                step(x, y)
                times[key].append(time.perf_counter() - start)
    return times


def measure(name: str, model: nn.Module, size: int, channels: int, steps: int, rounds: int) -> float:
    batches = list(bench_models.digits("train", size, channels, batch_size=64, limit=64 * steps))
    calib = bench_models.digits("train", size, channels, batch_size=64, limit=512)
    qmodel = quant.prepare(copy.deepcopy(model), "tensorrt")
    ptq.calibrate(qmodel, calib, "max")
    variants = {
        "FP32": make_step(copy.deepcopy(model), qat=False),
        "QAT": make_step(qmodel, qat=True),
        "QAT w/o weight-amax refresh": make_step(copy.deepcopy(qmodel), qat=False),
    }
    interleaved_steps(variants, batches[:2], 1)  # warm-up
    times = interleaved_steps(variants, batches, rounds)
    fp32 = statistics.median(times["FP32"])
    print(f"{name}: batch 64, {steps} steps x {rounds} rounds per variant")
    for key, ts in times.items():
        med = statistics.median(ts)
        print(f"  {key:28s}: median {med * 1000:7.1f} ms  min {min(ts) * 1000:7.1f} ms  ({med / fp32:.2f}x)")
    return statistics.median(times["QAT"]) / fp32


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8, help="batches per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average at start {os.getloadavg()[0]:.2f}")
    start = time.perf_counter()
    ratios = {
        "resnet18 digits 32x32": measure("resnet18 32x32", *bench_models.resnet18(), args.steps, args.rounds),
        "digits_cnn 8x8": measure("digits_cnn 8x8", *bench_models.digits_cnn(), args.steps, args.rounds),
    }
    print()
    for name, ratio in ratios.items():
        print(f"{name}: QAT step / FP32 step = {ratio:.2f} (target <= 1.5)")
    print(f"(benchmark wall time {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
