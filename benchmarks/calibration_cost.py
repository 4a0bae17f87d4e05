"""Cost of histogram calibration on the CPU.

usage: python benchmarks/calibration_cost.py [--repeats 3] [--limit 1437] [--threads N]

(a) ``ptq.calibrate(q, batches, "percentile")`` against a plain float forward (eval, no_grad) of the
    same model over the same pre-built batches (digits train split, batch 64), for resnet18 (digits
    at 32x32 RGB, tensorrt target) and digits_cnn (8x8). The calibration is split into the
    collection pass (histogram quantizers attached, one forward) and the amax search (one
    ``compute_amax`` per activation quantizer). Target: collection / plain forward <= 1.5.
(b) Entropy (KL) amax search per tensor: ``search.entropy_amax`` on 2048-bin histograms, from the
    real resnet18 activations plus heavy-tailed random tensors; median over tensors. Target <= 20 ms.
Plain forward and collection run each batch back to back and keep each batch's fastest of
``--repeats`` passes, so background load hits both alike; other timings are best of ``--repeats``.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

import bench_models  # noqa: E402
from timing import best_of  # noqa: E402

from compress import ptq, quant  # noqa: E402
from compress.ptq import HistogramCalibrator, Method  # noqa: E402
from compress.ptq.search import entropy_amax  # noqa: E402
from compress.quant.quantizer import TensorQuantizer  # noqa: E402

Batches = list[tuple[torch.Tensor, torch.Tensor]]


def load_batches(size: int, channels: int, limit: int) -> Batches:
    return [(x, y) for x, y in bench_models.digits("train", size, channels, batch_size=64, limit=limit)]


def activation_quantizers(model: nn.Module) -> list[TensorQuantizer]:
    """The quantizers ``ptq.calibrate`` feeds from data (per-tensor, enabled)."""
    return [q for _, q in quant.quantizers(model) if q.spec.axis is None and q.quant_enabled]


def plain_forward(model: nn.Module, batches: Batches) -> None:
    with torch.no_grad():
        for x, _ in batches:
            model(x)


Pairs = list[tuple[TensorQuantizer, HistogramCalibrator]]


@contextmanager
def collecting(qmodel: nn.Module) -> Iterator[Pairs]:
    """Histogram calibrators attached as ``ptq.calibrate`` attaches them (weight ranges set first,
    weight fake-quant off: activations are calibrated on the float model)."""
    quant.refresh_weight_amax(qmodel)
    weights = [q for _, q in quant.quantizers(qmodel) if q.spec.axis is not None]
    pairs = [(q, HistogramCalibrator()) for q in activation_quantizers(qmodel)]
    for q in weights:
        q.quant_enabled = False
    for q, cal in pairs:
        q.calibrator, q.calib_enabled = cal, True
    try:
        yield pairs
    finally:
        for q, _ in pairs:
            q.calibrator, q.calib_enabled = None, False
        for q in weights:
            q.quant_enabled = True


def collect(qmodel: nn.Module, batches: Batches) -> Pairs:
    """The collection pass of a histogram calibration."""
    with collecting(qmodel) as pairs:
        plain_forward(qmodel, batches)
    return pairs


@torch.no_grad()
def interleaved(model: nn.Module, qmodel: nn.Module, batches: Batches, repeats: int) -> tuple[float, float]:
    """Seconds for (plain forward, collection pass) over ``batches``: each batch runs through both
    back to back, and each batch's time is its fastest over ``repeats`` passes (robust to load)."""
    plain = [float("inf")] * len(batches)
    coll = [float("inf")] * len(batches)
    for _ in range(repeats):
        with collecting(qmodel):
            for i, (x, _) in enumerate(batches):
                start = time.perf_counter()
                model(x)
                mid = time.perf_counter()
                qmodel(x)
                plain[i] = min(plain[i], mid - start)
                coll[i] = min(coll[i], time.perf_counter() - mid)
    return sum(plain), sum(coll)


def search(pairs: Pairs, method: Method) -> None:
    for q, cal in pairs:
        levels = 256 if q.spec.unsigned and cal.nonneg else 128
        cal.compute_amax(method, percentile=99.99, levels=levels)


def measure_calibration(name: str, model: nn.Module, batches: Batches, repeats: int) -> tuple[float, float]:
    """Print the timings for one model; returns ``(collection / plain, full calibrate / plain)``."""
    qmodel = quant.prepare(copy.deepcopy(model), "tensorrt").eval()
    samples = sum(len(x) for x, _ in batches)
    plain_forward(model, batches)  # warm-up (allocator, oneDNN primitives)
    collect(qmodel, batches)
    t_plain, t_collect = interleaved(model, qmodel, batches, repeats)
    pairs = collect(qmodel, batches)
    t_search = best_of(lambda: search(pairs, Method.percentile), repeats)
    t_entropy = best_of(lambda: search(pairs, Method.entropy), 1)
    t_full = best_of(lambda: ptq.calibrate(qmodel, batches, "percentile"), repeats)
    print(f"{name}: {samples} samples, {len(batches)} batches of 64, {len(pairs)} activation quantizers")
    print(f"  plain float forward        : {t_plain * 1000:8.1f} ms")
    print(f"  histogram collection pass  : {t_collect * 1000:8.1f} ms  ({t_collect / t_plain:.2f}x)")
    print(f"  percentile amax search     : {t_search * 1000:8.1f} ms  (all quantizers)")
    print(f"  entropy amax search        : {t_entropy * 1000:8.1f} ms  (all quantizers)")
    print(f"  ptq.calibrate(percentile)  : {t_full * 1000:8.1f} ms  ({t_full / t_plain:.2f}x, whole call, best of "
          f"{repeats})")
    return t_collect / t_plain, t_full / t_plain


def real_histograms(model: nn.Module, batches: Batches) -> list[tuple[torch.Tensor, float, int]]:
    """``(hist, width, levels)`` of every activation quantizer of ``model`` (tensorrt target)."""
    qmodel = quant.prepare(copy.deepcopy(model), "tensorrt").eval()
    out = []
    for q, cal in collect(qmodel, batches):
        assert cal.hist is not None
        out.append((cal.hist, cal.range / cal.bins, 256 if q.spec.unsigned and cal.nonneg else 128))
    return out


def random_histograms(count: int) -> list[tuple[torch.Tensor, float, int]]:
    """Heavy-tailed activations: Student-t (signed) and ReLU'd Laplace (non-negative), 1M values each."""
    torch.manual_seed(0)
    out = []
    for k in range(count):
        if k % 2:
            x = torch.distributions.StudentT(2.0 + k % 4).sample((64, 64, 16, 16))
        else:
            x = torch.relu(torch.distributions.Laplace(0.0, 1.0 + k % 3).sample((64, 64, 16, 16)))
        cal = HistogramCalibrator()
        cal.collect(x)
        assert cal.hist is not None
        out.append((cal.hist, cal.range / cal.bins, 256 if cal.nonneg else 128))
    return out


def entropy_ms(hists: list[tuple[torch.Tensor, float, int]], repeats: int) -> list[float]:
    entropy_amax(*hists[0])  # warm-up
    return [best_of(lambda h=h: entropy_amax(*h), repeats) * 1000 for h in hists]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--limit", type=int, default=1437, help="calibration samples (1437 = the whole train split)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, best of {args.repeats}, "
          f"load average at start {os.getloadavg()[0]:.2f}")
    start = time.perf_counter()
    resnet, size, channels = bench_models.resnet18()
    resnet_batches = load_batches(size, channels, args.limit)
    cnn, csize, cchannels = bench_models.digits_cnn()
    cnn_batches = load_batches(csize, cchannels, args.limit)

    ratios = {
        "resnet18 digits 32x32 (tensorrt)": measure_calibration("resnet18 32x32", resnet, resnet_batches, args.repeats),
        "digits_cnn 8x8 (tensorrt)": measure_calibration("digits_cnn 8x8", cnn, cnn_batches, args.repeats),
    }
    real = real_histograms(resnet, resnet_batches)
    synthetic = random_histograms(8)
    times = entropy_ms(real + synthetic, args.repeats)
    real_ms, synthetic_ms = times[: len(real)], times[len(real) :]
    print(f"entropy amax search over {len(times)} 2048-bin histograms: median {statistics.median(times):.2f} ms, "
          f"min {min(times):.2f}, max {max(times):.2f} (median of the {len(real)} real resnet18 ones "
          f"{statistics.median(real_ms):.2f}, of the {len(synthetic)} heavy-tailed random ones "
          f"{statistics.median(synthetic_ms):.2f})")
    print()
    for name, (collect_ratio, full_ratio) in ratios.items():
        print(f"{name}: histogram calibration (whole ptq.calibrate call) / plain forward = {full_ratio:.2f} "
              f"(target <= 1.5)  [collection pass alone: {collect_ratio:.2f}]")
    print(f"entropy amax search = {statistics.median(times):.2f} ms per tensor (target <= 20)")
    print(f"(benchmark wall time {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
