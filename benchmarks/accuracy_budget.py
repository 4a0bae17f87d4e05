"""Accuracy budget (issue 19): per-unit float fallback to 0.3 pt, measured on the ONNX Runtime engine, vs ModelOpt AutoQuantize.

usage: python benchmarks/accuracy_budget.py [--model mobilenet_v2|efficientnet_b0|vit_tiny|all] [--threads 2]
                                            [--iters 30] [--max-drop 0.3] [--search-from max[,auto]] [--skip-modelopt]
                                            [--confirm 0.5]
ModelOpt rows need nvidia-modelopt (pip install 'compress[bench]', or a ``pip install --target DIR`` of it on
PYTHONPATH); without it they are left out and said so. Checkpoints are cached under runs/bench/ of the cwd.

Task ("hard digits"): sklearn digits at 32x32 RGB in [-1, 1] (bench_models.digits), every image (train and test
alike) multiplied by its own contrast gain exp(0.7 z) (z standard normal), plus Gaussian noise of std 0.1, and in
10% of the images 4 hot pixels (all channels) at 200, as a sensor's stuck pixels; all drawn from a fixed generator
per split. Why: on plain digits these models lose nothing to PTQ (quant_accuracy.py: MobileNetV2 max within 1
sample), so there is nothing to budget. The float model learns to ignore the hot pixels; a max (or 99.99
percentile) calibrator fits them, which leaves a handful of levels for the usual image in the input quantizer and
in every layer the outlier reaches unsaturated (SiLU in EfficientNet-B0, the ViT's residual stream; ReLU6 stops
it after MobileNetV2's stem). With hot pixels at 50 MobileNetV2 lost 1.1 pt (test) under max and gained on val:
too close to the noise of 360 samples to budget. Train split (1437) -> a fixed permutation: 1077 train, 360 held
out as ``val`` (the search's data; never the test split); calibration: the first 256 of the 1077. Test: the
360-image test split (1 sample = 0.28 pt, so the 0.3 pt budget allows one sample), which the search never sees.
Models (num_classes 10, trained on the 1077 once with a cosine schedule, last epoch kept, cached under
runs/bench/budget_*.pt): torchvision MobileNetV2 width 0.5 (SGD 0.05, 6 epochs), EfficientNet-B0 (SGD 0.05,
25 epochs, stochastic depth off: AdamW 2e-3 for 6 epochs left it at 17.5 %, near chance), ``compress.zoo:vit_tiny``
(AdamW 1e-3, 20 epochs). Short schedules on 1077 images (a few minutes
each on 2 shared cores), so FP32 top-1 is well below what these models reach on clean digits.

Rows per model (target ``onnxruntime``, INT8 attention for the ViT):
- FP32; all-INT8 PTQ with each calibrator (max, percentile, entropy, mse, auto), with the calibrate call's time;
  top-1 of the fake-quant model in PyTorch ("torch") and, for FP32, max and the searched models, of the ONNX
  Runtime engine;
- budget: ``compress.ptq.fallback(qmodel, val, max_drop, confirm=0.5, engine=...)`` on the all-INT8 model of each
  ``--search-from`` calibrator (default max: plain PTQ), as ``ptq: {budget: {engine: true}}`` does: val split into
  a search part (180, the table and the order) and a confirm part (180, every other image; chose nothing; 1 sample
  = 0.56 pt), a step met only when both parts and the engine over the confirm part meet it. The note and VERDICT
  give the kept step's val drops (search, confirm, engine on confirm) next to the test drop; units kept float,
  share of MACs still INT8, search time (sensitivity table included), forward passes over either part;
- latency: each engine exported at opset 13 (``Engines`` of transformer_int8: file at extended, session at all),
  batch 8, p50 over ``--iters`` rounds, all sessions timed round-robin with spinning off; ratios to FP32 and
  to all-INT8 (max).
- ModelOpt 0.47 ``mtq.auto_quantize`` (``quantization_formats=[INT8_DEFAULT_CFG]``, so per layer INT8 or no
  quantization; gradient scores with cross-entropy) on the same FP32 checkpoint, calibrated and scored on the
  same 256 calibration images; ``effective_bits`` (ModelOpt's weight bits: 8 all INT8, 16 none) swept from 8 up,
  the scores computed once (its ``checkpoint`` file reused by the later points), and the point reported whose
  test top-1 is the first to reach our budget(max) model's fake-quant test top-1, capped at FP32 - max_drop
  (ours may land above FP32 by noise), else the closest: its
  quantized layers, their MAC share, its fake-quant test top-1 in PyTorch and the first (scoring) call's time.
  The sweep looks at the test split to pick a point (what "a budget that lands at the same accuracy" needs);
  ours never does. ModelOpt's model is not exported, so it has no engine latency here.
Verdicts per model: budget met on test (engine drop <= max_drop), INT8 MAC share, latency; auto vs the best
single calibrator (torch top-1 and calibration time).

Measured before the confirm part and the harm ranking (search and check on all 360 val images, units ranked by
recovery alone) unless said otherwise; both rows are remeasured with both (remeasured lines).

Measured (2 shared cores at load 4-10, so times are loose; test top-1 of the engines):
- MobileNetV2 0.5: FP32 80.56, all-INT8 max 56.67 (every calibrator 56.7-59.2: with the outlier 40x the image's
  range, 2048 histogram bins leave the usual values a few dozen bins, so entropy/mse cannot clip well either);
  budget from max: 1 of 76 units float (the stem conv), 80.28 (-0.28, met), 94.4 % of MACs INT8; batch-8 p50
  1.08 ms vs FP32 1.11 and all-INT8 1.22 (INT8 is no faster than FP32 at 32x32 here); search 581 s, 156
  passes. ModelOpt at the same 80.28: 45/53 layers, 81.1 % of MACs INT8, 15 s (effective_bits 8.05).
  Remeasured with confirm 0.5 and the harm ranking: the same unit float, test 80.28 (-0.28, met), 94.4 %; val drop
  search -1.67, confirm -0.56, engine on confirm -1.11; search 154 s (the table on 180 images), 159 passes.
- vit_tiny: FP32 87.22, all-INT8 max 9.17 (the outlier rides the residual stream). Before: 23 of 31 units float,
  val -0.28 (met) but test 83.61 (-3.61, NOT met: the greedy search fits 360 val images), 50.3 % of MACs INT8;
  search 108 s, 88 passes. Now (confirm 0.5, harm ranking): 9 of 31 units float (the five graph quantizers of the
  residual stream / token path that each cost 20-63 pt alone, first), val drop search +0.00, confirm -0.56 (a
  sample gained), engine on confirm -0.56, test **86.94 (-0.28, met: 1 sample of 360)**, 85.8 % of MACs INT8;
  p50 0.81 ms vs FP32 0.71 and all-INT8 0.85; search 34 s, 85 passes. Separately (scripts not kept): confirm 0.5
  with the old recovery ranking met the budget only with all 31 units float (0 % INT8: recovery alone is noise when
  five units each break the model); the harm ranking with confirm 0 kept 8 units float, test -0.00. So the ranking
  made the search find the faults; the confirm part makes "met" a statement about samples that chose nothing
  (with 180 of them a 0.3 pt budget means no sample lost net, and it is warned about). ModelOpt (its 8 weighted
  layers; it puts no quantizer on the attention MatMuls or residual adds, so its all-INT8 point is 41.67, not 9)
  reaches 87.22 with 6/8 layers, 50.3 % of MACs INT8, 6 s (effective_bits 10).
- EfficientNet-B0 (confirm 0.5, harm ranking; load 2-6): FP32 64.72, all-INT8 max 7.50 (-57.22: the hot pixels
  ride every SiLU unsaturated; percentile 19.44 is the best single calibrator, auto 13.61, -5.83 pt, 93 s vs 64 s);
  budget from max: **met on test (66.67, +1.94, within noise of FP32)**, val drop search -0.56 / confirm 0.00 /
  engine on confirm 0.00, but with 116 of 119 units float: **0.3 % of MACs INT8**; p50 6.77 ms vs FP32 5.82 and
  all-INT8 20.95 (ORT runs this INT8 graph 3.6x slower than FP32: the Q/DQ around SiLU/SE multiplies are not
  fused); search 1116 s, 476 passes. ModelOpt (the torchvision in-place SiLU turned off for its gradient hooks) at
  effective_bits 12: 27/82 layers INT8, **23.6 % of MACs INT8 at 64.44 (-0.28)**, 14.6 s: ModelOpt keeps far
  more INT8 at the budget here. Why we lose: our units include the activation quantizers of every residual add and
  SE multiply (ModelOpt puts none there), so the outlier reaches INT8 tensors ModelOpt leaves float, and no single
  unit floated recovers accuracy until nearly all are (the greedy walks one unit a step). (The sweep's
  printed target in that run was ours 66.67, before the cap at FP32 - 0.3; 12 bits is its first point >= 64.42.)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import itertools
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import compress
import compress.metrics
from compress import ptq, quant
from compress.export.bench import latency_interleaved
from compress.export.onnx import export_onnx
from compress.export.onnxruntime import OrtEngine
from compress.profile import profile_macs

sys.path.insert(0, str(Path(__file__).parent))

import bench_models  # noqa: E402
from modelopt_compare import load_modelopt  # noqa: E402
from transformer_int8 import Engines  # noqa: E402

TARGET = "onnxruntime"
METHODS = ("max", "percentile", "entropy", "mse", "auto")
GAIN_SIGMA, NOISE_STD = 0.7, 0.1
HOT_SHARE, HOT_PIXELS, HOT_VALUE = 0.1, 4, 200.0  # images with hot pixels, pixels each, their value
DATA_TAG = f"g{GAIN_SIGMA:g}n{NOISE_STD:g}h{HOT_SHARE:g}x{HOT_PIXELS}v{HOT_VALUE:g}"  # in the checkpoint's name
VAL, CALIB = 360, 256
EVAL_BATCH = 360  # val and test in one batch each: a search pass is one forward (the fake-quant cost is per call)
MODELS: dict[str, tuple[str, dict, int, float, str]] = {  # factory, kwargs, epochs, lr, optimizer
    "mobilenet_v2": ("torchvision.models:mobilenet_v2", {"num_classes": 10, "width_mult": 0.5}, 6, 0.05, "sgd"),
    # SGD, no stochastic depth, 25 epochs: AdamW 2e-3 for 6 epochs left it at 17.5 % (barely above chance)
    "efficientnet_b0": ("torchvision.models:efficientnet_b0", {"num_classes": 10, "stochastic_depth_prob": 0.0}, 25,
                        0.05, "sgd"),
    "vit_tiny": ("compress.zoo:vit_tiny", {"num_classes": 10}, 20, 1e-3, "adamw"),
}
BITS = (8.0, 8.02, 8.05, 8.1, 8.15, 8.2, 8.25, 8.5, 9.0, 10.0, 12.0, 14.0)  # later points reuse the scores: cheap


# ----------------------------------------------------------------------------------------------
# data


def hard_digits(split: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole digits split at 32x32 RGB with per-image contrast gain and noise (module docstring)."""
    xs, ys = zip(*[(x, y) for x, y in bench_models.digits(split, 32, 3, batch_size=512)], strict=True)
    x, y = torch.cat(xs), torch.cat(ys)
    gen = torch.Generator().manual_seed(seed)
    gain = torch.exp(GAIN_SIGMA * torch.randn(len(x), 1, 1, 1, generator=gen))
    x = x * gain + NOISE_STD * torch.randn(x.shape, generator=gen)
    hot = torch.rand(len(x), generator=gen) < HOT_SHARE
    pixels = torch.randint(0, x.shape[2] * x.shape[3], (len(x), HOT_PIXELS), generator=gen)
    for i in hot.nonzero().flatten().tolist():
        x[i].flatten(1)[:, pixels[i]] = HOT_VALUE
    return x, y


@dataclass
class Splits:
    train: DataLoader  # shuffled
    calib: DataLoader
    val: DataLoader
    test: DataLoader

    @property
    def example(self) -> torch.Tensor:
        return next(iter(self.test))[0][:8]


def splits() -> Splits:
    x, y = hard_digits("train", 1)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train_idx, val_idx = order[VAL:], order[:VAL]
    xt, yt = hard_digits("test", 2)

    def loader(a: torch.Tensor, b: torch.Tensor, shuffle: bool = False, batch: int = 64) -> DataLoader:
        return DataLoader(TensorDataset(a, b), batch_size=batch, shuffle=shuffle,
                          generator=torch.Generator().manual_seed(0) if shuffle else None)

    return Splits(loader(x[train_idx], y[train_idx], shuffle=True), loader(x[train_idx[:CALIB]], y[train_idx[:CALIB]]),
                  loader(x[val_idx], y[val_idx], batch=EVAL_BATCH), loader(xt, yt, batch=EVAL_BATCH))


def trained(name: str, data: Splits) -> tuple[nn.Module, float]:
    """The FP32 model (cached under runs/bench/) and the seconds it took to train or load."""
    factory, kwargs, epochs, lr, optimizer = MODELS[name]
    path = bench_models.CACHE / f"budget_{name}_e{epochs}_{DATA_TAG}.pt"
    start = time.perf_counter()
    if path.exists():
        return compress.load(path).eval(), time.perf_counter() - start
    torch.manual_seed(0)
    model = compress.build(factory, kwargs)
    config = compress.FinetuneConfig(epochs=epochs, lr=lr, optimizer=optimizer, seed=0, keep_best=False)
    compress.finetune(model, data.train, config, progress=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    compress.save(model, path)
    return model.eval(), time.perf_counter() - start


def top1(runner: object, loader: DataLoader) -> float:
    return 100.0 * compress.metrics.score("top1", compress.metrics.collect(runner, loader))["top1"]


# ----------------------------------------------------------------------------------------------
# ours


@dataclass
class Row:
    label: str
    torch: float | None  # test top-1 %, PyTorch (fake-quant)
    engine: float | None = None  # test top-1 %, ONNX Runtime
    seconds: float | None = None  # calibration or search time
    int8_share: float | None = None  # MACs still INT8
    note: str = ""
    path: Path | None = None  # the engine file


@dataclass
class Result:
    name: str
    rows: list[Row] = field(default_factory=list)
    latency: dict[str, float] = field(default_factory=dict)  # label -> p50 ms
    modelopt: list[str] = field(default_factory=list)  # printed lines

    def row(self, label: str) -> Row:
        return next(r for r in self.rows if r.label == label)


def engine_builder(example: torch.Tensor, folder: Path, threads: int):  # noqa: ANN201
    """``model -> OrtEngine`` as the ptq stage's ``budget.engine`` does (export at opset 13, ORT level all)."""
    count = itertools.count()

    def build(model: nn.Module) -> OrtEngine:
        path = folder / f"step{next(count)}.onnx"
        export_onnx(model, example, path, opset=13)
        return OrtEngine(path, threads)

    return build


def val_figures(found: ptq.Fallback) -> str:
    """The kept step's drops on val: the search part, the confirm part, the engine over the confirm part."""
    s = found.step
    parts = [f"val drop: search {s.drop:+.2f} ({found.sensitivity.samples} samples)"]
    if s.confirm_drop is not None:
        parts.append(f"confirm {s.confirm_drop:+.2f} ({found.confirm_samples} samples, 1 = {found.sample_pt:.2f} pt)")
    if s.engine_drop is not None:
        parts.append(f"engine on {'confirm' if s.confirm_drop is not None else 'val'} {s.engine_drop:+.2f}")
    return ", ".join(parts)


def ours(name: str, model: nn.Module, data: Splits, build: Engines, max_drop: float,
         search_from: tuple[str, ...], confirm: float) -> tuple[Result, dict]:
    result = Result(name)
    fp32_path = build.build(copy.deepcopy(model), data.example, f"{name}_fp32")
    result.rows.append(Row("FP32", top1(model, data.test), top1(build.session(fp32_path), data.test), path=fp32_path))
    calibrated: dict[str, nn.Module] = {}
    for method in METHODS:
        qmodel = quant.prepare(copy.deepcopy(model), TARGET, example_input=data.example)
        start = time.perf_counter()
        ptq.calibrate(qmodel, data.calib, method, limit=CALIB)
        seconds = time.perf_counter() - start
        qmodel.eval()
        calibrated[method] = qmodel
        row = Row(f"INT8 {method}", top1(qmodel, data.test), seconds=seconds, int8_share=1.0)
        if method in ("max", *search_from):
            row.path = build.build(qmodel, data.example, f"{name}_int8_{method}", TARGET)
            row.engine = top1(build.session(row.path), data.test)
        result.rows.append(row)
    searches = {}
    for method in search_from:
        qmodel = copy.deepcopy(calibrated[method])
        with tempfile.TemporaryDirectory(dir=build.folder) as tmp:
            found = ptq.fallback(qmodel, data.val, max_drop, "top1", confirm=confirm,
                                 engine=engine_builder(data.example, Path(tmp), build.threads))
        step = found.step
        path = build.build(qmodel, data.example, f"{name}_budget_{method}", TARGET)
        floated = ", ".join(step.float_units) if len(step.float_units) <= 4 else \
            ", ".join(step.float_units[:4]) + f", +{len(step.float_units) - 4}"
        note = (f"{val_figures(found)} ({'met' if found.met else 'NOT met'}), "
                f"{len(step.float_units)}/{len(found.sensitivity.rows)} units float: {floated or 'none'}; "
                f"{found.passes} passes")
        result.rows.append(Row(f"budget {max_drop} from {method}", top1(qmodel, data.test),
                               top1(build.session(path), data.test), found.seconds, step.int8_macs_share, note, path))
        searches[method] = found
    return result, searches


def measure_latency(result: Result, build: Engines, example: torch.Tensor, iters: int) -> None:
    timed = [r for r in result.rows if r.path is not None]
    sessions = [build.session(r.path, spinning=False) for r in timed]
    timings = latency_interleaved(sessions, example[:1], (8,), iters=iters)
    result.latency = {r.label: t["8"]["p50_ms"] for r, t in zip(timed, timings, strict=True)}


# ----------------------------------------------------------------------------------------------
# ModelOpt


def modelopt(mtq: object, model: nn.Module, data: Splits, target_top1: float, folder: Path) -> list[str]:
    """Lines describing ModelOpt AutoQuantize's sweep and the point at our accuracy."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    macs = profile_macs(copy.deepcopy(model), data.example[:1])
    batches = list(data.calib)
    ckpt = folder / "autoquant_scores.pth"
    lines, points = [], []
    first_seconds = None
    half = 50.0 / len(data.test.dataset)  # half a test sample in points: top-1s from different runs differ in float noise
    for bits in BITS:
        work = copy.deepcopy(model).eval()
        for module in work.modules():  # its gradient scores hook every layer's output: torchvision's in-place
            if getattr(module, "inplace", False):  # activations (EfficientNet's SiLU) then fail autograd's
                module.inplace = False  # view check; out of place computes the same values
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            work, _state = mtq.auto_quantize(
                work, constraints={"effective_bits": bits}, quantization_formats=[mtq.INT8_DEFAULT_CFG],
                data_loader=batches, forward_step=lambda m, b: m(b[0]),
                loss_func=lambda out, b: F.cross_entropy(out, b[1]), num_calib_steps=len(batches),
                num_score_steps=len(batches), checkpoint=str(ckpt))
        seconds = time.perf_counter() - start
        first_seconds = seconds if first_seconds is None else first_seconds
        work.eval()
        layers = [n for n, m in work.named_modules() if hasattr(m, "weight_quantizer")]
        quantized = [n for n in layers if isinstance(work.get_submodule(n).weight_quantizer, TensorQuantizer)
                     and work.get_submodule(n).weight_quantizer.is_enabled]
        share = sum(macs.modules.get(n, 0) for n in quantized) / macs.total
        with torch.no_grad():
            acc = top1(work, data.test)
        points.append((bits, len(quantized), len(layers), share, acc, seconds))
        if acc >= target_top1 - half:
            break
    lines.append("ModelOpt sweep (effective_bits: INT8 layers/layers, MAC share INT8, fake-quant test top-1, s): " +
                 "; ".join(f"{b:g}: {q}/{n}, {s:.1%}, {a:.2f}, {t:.1f}" for b, q, n, s, a, t in points))
    reached = [p for p in points if p[4] >= target_top1 - half]
    bits, q, n, share, acc, _ = reached[0] if reached else min(points, key=lambda p: abs(p[4] - target_top1))
    lines.append(f"ModelOpt AutoQuantize INT8|none at effective_bits {bits:g}: {q}/{n} layers INT8, {share:.1%} of "
                 f"MACs INT8, fake-quant test top-1 {acc:.2f} (ours budget(max) torch {target_top1:.2f}"
                 f"{'' if reached else ', NOT reached by the sweep'}); search time {first_seconds:.1f} s "
                 f"(first call: calibration + gradient scores; later points reuse the scores)")
    return lines


# ----------------------------------------------------------------------------------------------
# report


def print_result(result: Result, size: int, max_drop: float, search_from: tuple[str, ...],
                 searches: dict[str, ptq.Fallback]) -> None:
    fp32 = result.row("FP32")
    print(f"\n{result.name}: top-1 on {size} hard-digits test images (1 sample = {100 / size:.2f} pt); "
          f"target {TARGET}, ORT level all, batch 8 p50")
    print(f"{'':22s} {'torch %':>8s} {'engine %':>9s} {'drop pt':>8s} {'s':>7s} {'INT8 MACs':>9s} "
          f"{'p50 ms':>7s} {'/FP32':>6s} {'/INT8':>6s}  note")
    int8_ms = result.latency.get("INT8 max")
    for r in result.rows:
        ref, val = (fp32.engine, r.engine) if r.engine is not None else (fp32.torch, r.torch)
        drop = "" if r is fp32 else f"{ref - val:+8.2f}"
        ms = result.latency.get(r.label)
        cells = [f"{r.torch:8.2f}", f"{r.engine:9.2f}" if r.engine is not None else f"{'-':>9s}", f"{drop:>8s}",
                 f"{r.seconds:7.2f}" if r.seconds is not None else f"{'':>7s}",
                 f"{r.int8_share:9.1%}" if r.int8_share is not None else f"{'':>9s}",
                 f"{ms:7.3f}" if ms is not None else f"{'':>7s}",
                 f"{ms / result.latency['FP32']:6.3f}" if ms is not None else f"{'':>6s}",
                 f"{ms / int8_ms:6.3f}" if ms is not None and int8_ms else f"{'':>6s}"]
        print(f"{r.label:22s} {' '.join(cells)}  {r.note}")
    for line in result.modelopt:
        print(line)
    for method in search_from:
        r, base = result.row(f"budget {max_drop} from {method}"), result.row(f"INT8 {method}")
        drop = fp32.engine - r.engine
        lat = result.latency
        print(f"VERDICT {result.name} budget from {method}: test engine drop {drop:+.2f} pt "
              f"(all-INT8 {fp32.engine - base.engine:+.2f}; {val_figures(searches[method])}) -> "
              f"{'met' if drop <= max_drop + 1e-9 else 'NOT met'} on test; "
              f"{r.int8_share:.1%} of MACs INT8; latency {lat[r.label] / lat['FP32']:.3f}x FP32, "
              f"{lat[r.label] / lat['INT8 max']:.3f}x all-INT8(max)")
    singles = [result.row(f"INT8 {m}") for m in METHODS if m != "auto"]
    best = max(singles, key=lambda r: r.torch)
    auto = result.row("INT8 auto")
    print(f"VERDICT {result.name} auto vs best single ({best.label[5:]}): top-1 {auto.torch:.2f} vs {best.torch:.2f} "
          f"({auto.torch - best.torch:+.2f} pt); calibration {auto.seconds:.2f} s vs {best.seconds:.2f} s "
          f"({auto.seconds / best.seconds:.2f}x)")


def run_model(name: str, data: Splits, args: argparse.Namespace, mtq: object, folder: Path) -> None:
    model, seconds = trained(name, data)
    start = time.perf_counter()
    build = Engines(folder, args.threads)
    search_from = tuple(args.search_from.split(","))
    result, searches = ours(name, model, data, build, args.max_drop, search_from, args.confirm)
    measure_latency(result, build, data.example, args.iters)
    if mtq is not None:
        try:
            # the accuracy ModelOpt must land at: ours, but no higher than the budget's floor (ours can land above
            # FP32 by a sample or two of noise, which no budget asks of ModelOpt)
            floor = result.row("FP32").torch - args.max_drop
            ours_top1 = result.row(f"budget {args.max_drop} from max").torch
            result.modelopt = modelopt(mtq, model, data, min(ours_top1, floor), folder)
        except Exception as exc:  # a benchmark reports a foreign library's failure and goes on
            result.modelopt = [f"ModelOpt AutoQuantize rows left out: {type(exc).__name__}: {str(exc)[:300]}"]
    else:
        result.modelopt = ["ModelOpt AutoQuantize rows left out: nvidia-modelopt not installed (or --skip-modelopt)"]
    print_result(result, len(data.test.dataset), args.max_drop, search_from, searches)
    print(f"({name}: trained/loaded in {seconds:.0f} s, measured in {time.perf_counter() - start:.0f} s)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=[*MODELS, "all"], default="all")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--max-drop", type=float, default=0.3)
    parser.add_argument("--skip-modelopt", action="store_true")
    parser.add_argument("--confirm", type=float, default=0.5,
                        help="share of val held out to confirm each step (ptq.fallback confirm; 0: none)")
    parser.add_argument("--search-from", default="max",
                        help="calibrators whose all-INT8 model the budget search starts from (max,auto)")
    args = parser.parse_args()
    if not set(args.search_from.split(",")) <= set(METHODS):
        parser.error(f"--search-from: {args.search_from!r}: a comma-separated subset of {', '.join(METHODS)}")
    torch.set_num_threads(args.threads)
    mtq = None if args.skip_modelopt else load_modelopt()
    start = time.perf_counter()
    print(f"torch threads {args.threads}, load average at start {os.getloadavg()[0]:.2f}, "
          f"modelopt {'present' if mtq is not None else 'absent'}")
    data = splits()
    with tempfile.TemporaryDirectory() as folder:
        for name in MODELS if args.model == "all" else (args.model,):
            run_model(name, data, args, mtq, Path(folder))
    print(f"\n(benchmark wall time {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
