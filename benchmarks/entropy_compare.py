"""Entropy calibration: our search against literal ports of TensorRT's and ONNX Runtime's, on the same tensors.

usage: python benchmarks/entropy_compare.py [--model mobilenet_v2|densenet|all] [--epochs 3] [--samples 256]
                                            [--checkpoint PATH]

Each activation quantizer of the model (prepared for the onnxruntime target, as the engine runs it)
sees the same calibration batches, fed at once to four collectors:
- ``ours``: ``HistogramCalibrator`` + ``compute_amax(entropy)`` as ``ptq.calibrate`` calls it
  (256 levels for a non-negative tensor on a uint8 target, else 128);
- ``trt``: pytorch-quantization's ``HistogramCalibrator`` (torch_hist branch: 2048 bins over
  [0, first max], grown by appending bins of the same width) and ``_compute_amax_entropy``
  (bin 0 := bin 1, groups from ``linspace(0, i, levels + 1)``, start bin 128, last argmin), with
  the same level count as ours, ported one candidate at a time in numpy;
- ``ort``: ONNX Runtime's own ``HistogramCollector`` (method entropy, 128 bins, 128 quantized bins:
  ``quantize_static``'s Entropy defaults), called directly; its amax is the upper threshold.
Printed per quantizer: the observed max |x|, each amax, and the share of values each one clips.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from onnxruntime.quantization.calibrate import HistogramCollector
from scipy.stats import entropy as kl_divergence

sys.path.insert(0, str(Path(__file__).parent))

import quant_accuracy  # noqa: E402

import compress  # noqa: E402
from compress import quant  # noqa: E402
from compress.ptq import HistogramCalibrator, Method  # noqa: E402


class TrtHistogram:
    """pytorch-quantization's histogram of |x|: 2048 bins over [0, first max], extended with bins of the same width."""

    def __init__(self, bins: int = 2048) -> None:
        self.bins = bins
        self.hist: torch.Tensor | None = None
        self.edges: torch.Tensor | None = None

    def collect(self, x: torch.Tensor) -> None:
        x = x.abs().float()
        top = x.max()
        if self.hist is None:
            self.hist = torch.histc(x, bins=self.bins, min=0, max=float(top))
            self.edges = torch.linspace(0, float(top), self.bins + 1)
            return
        assert self.edges is not None
        if top > self.edges[-1]:
            width = self.edges[1] - self.edges[0]
            self.bins = int((top / width).ceil().item())
            self.edges = torch.arange(0, float(top + width), float(width))
        hist = torch.histc(x, bins=self.bins, min=0, max=float(self.edges[-1]))
        hist[: self.hist.numel()] += self.hist
        self.hist = hist


def trt_entropy_amax(hist: np.ndarray, edges: np.ndarray, levels: int, start: int = 128) -> float:
    """``_compute_amax_entropy`` of pytorch-quantization, one candidate at a time (numpy inside a candidate)."""
    bins = hist.astype(np.int64).copy()
    bins[0] = bins[1]
    divergences = []
    for i in range(start, len(bins) + 1):
        group = np.digitize(np.arange(i), np.linspace(0, i, num=levels + 1)) - 1
        group[bins[:i] == 0] = -1
        keep = group >= 0
        counts = np.bincount(group[keep], weights=bins[:i][keep], minlength=levels)
        members = np.bincount(group[keep], minlength=levels)
        q = np.zeros(i)
        q[keep] = (counts / np.maximum(members, 1))[group[keep]]
        p = bins[:i].astype(np.float64)
        p[-1] += bins[i:].sum()
        divergences.append(kl_divergence(p, q))
    d = np.array(divergences)
    last_argmin = len(d) - 1 - int(np.argmin(d[::-1]))
    return float(edges[last_argmin + start])


class Probe:
    """Stands in for a quantizer's calibrator: feeds every batch to ours, TensorRT's and ORT's collectors."""

    def __init__(self) -> None:
        self.ours = HistogramCalibrator()
        self.trt = TrtHistogram()
        self.ort = HistogramCollector("entropy", symmetric=False, num_bins=128, num_quantized_bins=128,
                                      percentile=99.99, scenario="same")
        self.values: list[torch.Tensor] = []  # a subsample, to count clipped shares directly

    def collect(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        self.ours.collect(x)
        self.trt.collect(x)
        with contextlib.redirect_stdout(io.StringIO()):
            self.ort.collect({"t": x.cpu().numpy()})
        self.values.append(x.flatten()[:: max(1, x.numel() // 20000)])

    def amaxes(self, unsigned_target: bool) -> dict[str, float]:
        levels = 256 if unsigned_target and self.ours.nonneg else 128
        assert self.trt.hist is not None and self.trt.edges is not None
        with contextlib.redirect_stdout(io.StringIO()):
            low, high = self.ort.compute_collection_result()["t"][:2]
        return {
            "ours": float(self.ours.compute_amax(Method.entropy, levels=levels)),
            "trt": trt_entropy_amax(self.trt.hist.numpy(), self.trt.edges.numpy(), levels),
            "ort": float(max(abs(low), abs(high))),
        }


def compare(name: str, model: torch.nn.Module, calib: torch.utils.data.DataLoader) -> None:
    qmodel = quant.prepare(model, "onnxruntime")
    probes: dict[str, Probe] = {}
    for qname, q in quant.quantizers(qmodel):
        if q.spec.axis is None:
            q.calibrator, q.calib_enabled = probes.setdefault(qname, Probe()), True
    for q in (q for _, q in quant.quantizers(qmodel) if q.spec.axis is not None):
        q.quant_enabled = False
    with torch.no_grad():
        for x, _ in calib:
            qmodel(x)
    print(f"\n{name}: entropy amax per activation quantizer (clip %: share of values above amax)")
    print(f"{'quantizer':52s} {'max|x|':>7s} {'ours':>7s} {'trt':>7s} {'ort':>7s} "
          f"{'clip% ours':>10s} {'trt':>6s} {'ort':>6s}  {'bins ours':>9s}")
    worst: Counter[str] = Counter()
    for qname, probe in probes.items():
        a = probe.amaxes(unsigned_target=True)
        values = torch.cat(probe.values).abs()
        top = float(values.max()) if len(values) else 0.0
        top = max(top, float(probe.ours.hist.nonzero().max() + 1) * probe.ours.range / probe.ours.bins)
        clip = {k: 100.0 * float((values > v).float().mean()) for k, v in a.items()}
        occupied = int(probe.ours.hist.nonzero().max()) + 1
        print(f"{qname[-52:]:52s} {top:7.3f} {a['ours']:7.3f} {a['trt']:7.3f} {a['ort']:7.3f} "
              f"{clip['ours']:10.3f} {clip['trt']:6.3f} {clip['ort']:6.3f}  {occupied:5d}/{probe.ours.bins}")
        for k in a:
            worst[k] = max(worst[k], clip[k])  # type: ignore[assignment]
    print("largest clipped share: " + ", ".join(f"{k} {v:.2f} %" for k, v in worst.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=[*quant_accuracy.ENGINE_MODELS, "all"], default="all")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--checkpoint", help="a compress checkpoint to use instead of training (one model)")
    args = parser.parse_args()
    names = list(quant_accuracy.ENGINE_MODELS) if args.model == "all" else [args.model]
    for name in names:
        if args.checkpoint:
            model = compress.load(args.checkpoint).eval()
        else:
            model = quant_accuracy.train_engine_model(name, args.epochs)
        calib = quant_accuracy.digits_loader("train", 32, 3, limit=args.samples)
        compare(name, model, calib)


if __name__ == "__main__":
    main()
