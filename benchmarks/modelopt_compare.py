"""INT8 PTQ side by side with NVIDIA ModelOpt: top-1 and calibration wall time on the same model and data.

usage: python benchmarks/modelopt_compare.py [--model digits_cnn|resnet18|all] [--repeats 3] [--budget 30]
needs: pip install 'compress[bench]'  (nvidia-modelopt; without it the script says so and exits 0)

Models: digits_cnn (8x8 digits) and torchvision resnet18 (digits 32x32 RGB) from bench_models.
Both libraries calibrate on the same DataLoader: the first 512 digits train samples, batch 64.
- ours: ``quant.prepare(model, "tensorrt")`` then ``ptq.calibrate`` with max, entropy, percentile 99.99.
- ModelOpt max: ``mtq.INT8_DEFAULT_CFG`` (per-channel weights, per-tensor inputs), i.e.
  ``mtq.quantize(model, INT8_DEFAULT_CFG, forward_loop)``, split into quantizer insertion
  (``algorithm`` None) and the timed ``mtq.calibrate(model, "max", forward_loop)``.
- ModelOpt entropy: the same config with ``"calibrator": "histogram"`` on the input quantizers.
  ModelOpt 0.47 has no "entropy" calibrate algorithm, and both ``algorithm="max"`` and
  ``finish_stats_collection(model, method="entropy")`` raise TypeError with per-channel max weight
  quantizers present, so the timed call is ModelOpt's own sequence: ``enable_stats_collection``,
  the forward loop, then ``load_calib_amax("entropy")`` on histogram calibrators and
  ``load_calib_amax()`` on max ones (``finish_stats_collection``'s body).
Calibration time: wall time of the whole calibrate call, best of ``--repeats`` (3) runs, each on a
freshly prepared copy (insertion is not timed, for either library). The two libraries' runs of a
method alternate, so background load hits both alike. To keep the script under ~5 minutes no new
run starts once an entry's runs took ``--budget`` (30 s) in all ("runs" column: runs actually timed).
top-1: on the digits test split (360 samples, so one sample is 0.28 pt).
Placement differs a little: ours (TensorRT rules) quantizes Conv/Linear inputs and the residual
input of each add; ModelOpt's INT8 config quantizes Conv/Linear and pooling inputs, not adds.
Targets: our best PTQ top-1 - ModelOpt's best >= 0 pt; our calibration time / ModelOpt's <= 1
for the same method (max, entropy).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import io
import logging
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import torch
from torch import nn
from torch.utils.data import DataLoader

import compress.metrics
from compress import ptq, quant

sys.path.insert(0, str(Path(__file__).parent))

import bench_models  # noqa: E402

MODELS: dict[str, Callable[[], tuple[nn.Module, int, int]]] = {
    "digits_cnn": bench_models.digits_cnn,
    "resnet18": bench_models.resnet18,
}
OURS = ("max", "entropy", "percentile")
THEIRS = ("max", "entropy")
CALIB_SAMPLES = 512

Loop = Callable[[nn.Module], None]


@dataclass(frozen=True)
class Timing:
    repeats: int
    budget: float  # seconds of timed calibration per entry after which no new run starts


@dataclass
class Entry:
    """One library + method: how to prepare a fresh model and calibrate it, and the timed runs."""

    library: str
    method: str
    setup: Callable[[], nn.Module]
    calibrate: Callable[[nn.Module], object]
    count_quantizers: Callable[[nn.Module], int]
    times: list[float] = field(default_factory=list)
    model: nn.Module | None = None

    def due(self, timing: Timing) -> bool:
        return len(self.times) < timing.repeats and sum(self.times) < timing.budget

    def run_once(self) -> None:
        model = self.setup()
        start = time.perf_counter()
        self.calibrate(model)
        self.times.append(time.perf_counter() - start)
        self.model = model


@dataclass
class Row:
    library: str
    method: str
    top1: float  # percent
    seconds: float = float("nan")  # best calibrate wall time
    runs: int = 0
    act_quantizers: int = 0


def load_modelopt(part: str = "quantization") -> ModuleType | None:
    """``modelopt.torch.<part>`` (quantization, sparsity), or None when it is not installed (import noise silenced)."""
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = importlib.import_module(f"modelopt.torch.{part}")
    except ImportError:
        return None
    warnings.filterwarnings("ignore", message="Cannot find transformers package")  # raised lazily, harmless here
    return module


def top1(model: nn.Module, loader: DataLoader) -> float:
    """Top-1 accuracy in percent."""
    return 100.0 * compress.metrics.score("top1", compress.metrics.collect(model, loader))["top1"]


def run_interleaved(entries: list[Entry], timing: Timing) -> None:
    """Time the entries' calibrate calls in turn (A, B, A, B, ...) until each is done."""
    while any(e.due(timing) for e in entries):
        for entry in entries:
            if entry.due(timing):
                entry.run_once()


# ----------------------------------------------------------------------------------------------
# ours


def our_act_quantizers(model: nn.Module) -> int:
    return sum(1 for _, q in quant.quantizers(model) if q.spec.axis is None and q.quant_enabled)


def ours(model: nn.Module, calib: DataLoader, method: str) -> Entry:
    return Entry(
        "compress",
        method,
        lambda: quant.prepare(copy.deepcopy(model), "tensorrt"),
        lambda q: ptq.calibrate(q, calib, method, limit=CALIB_SAMPLES),
        our_act_quantizers,
    )


# ----------------------------------------------------------------------------------------------
# ModelOpt


def modelopt_config(mtq: ModuleType, method: str) -> dict:
    """INT8_DEFAULT_CFG without calibration (insertion only); histogram input calibrators for entropy."""
    config = copy.deepcopy(mtq.INT8_DEFAULT_CFG)
    config["algorithm"] = None
    if method == "entropy":
        for entry in config["quant_cfg"]:
            if entry.get("quantizer_name") == "*input_quantizer":
                entry["cfg"] = {**entry["cfg"], "calibrator": "histogram"}
    return config


def modelopt_prepare(mtq: ModuleType, model: nn.Module, method: str) -> nn.Module:
    with contextlib.redirect_stdout(io.StringIO()):  # "Inserted N quantizers"
        return mtq.quantize(copy.deepcopy(model), modelopt_config(mtq, method), forward_loop=None)


def forward_loop(calib: DataLoader) -> Loop:
    def run(model: nn.Module) -> None:
        for x, _ in calib:
            model(x)

    return run


def entropy_calibrate(model: nn.Module, loop: Loop) -> None:
    """ModelOpt's histogram calibration with the entropy amax (see the module docstring)."""
    from modelopt.torch.quantization.calib import HistogramCalibrator
    from modelopt.torch.quantization.model_calib import enable_stats_collection
    from modelopt.torch.quantization.nn import TensorQuantizer

    model.eval()
    with torch.no_grad():
        enable_stats_collection(model)
        loop(model)
    for _, q in model.named_modules():
        if not isinstance(q, TensorQuantizer) or q._disabled:
            continue
        if q._calibrator is not None:
            if isinstance(q._calibrator, HistogramCalibrator):
                q.load_calib_amax("entropy")
            else:
                q.load_calib_amax()
        q.enable_quant()
        q.disable_calib()


def modelopt_act_quantizers(model: nn.Module) -> int:
    from modelopt.torch.quantization.nn import TensorQuantizer

    return sum(
        1 for _, q in model.named_modules() if isinstance(q, TensorQuantizer) and q.is_enabled and q.axis is None
    )


def theirs(mtq: ModuleType, model: nn.Module, calib: DataLoader, method: str) -> Entry:
    loop = forward_loop(calib)

    def calibrate(qmodel: nn.Module) -> None:
        if method == "max":
            mtq.calibrate(qmodel, algorithm="max", forward_loop=loop)
        else:
            entropy_calibrate(qmodel, loop)

    return Entry("modelopt", method, lambda: modelopt_prepare(mtq, model, method), calibrate, modelopt_act_quantizers)


# ----------------------------------------------------------------------------------------------
# report


def to_row(entry: Entry, test: DataLoader) -> Row:
    assert entry.model is not None
    model = entry.model
    return Row(
        entry.library,
        entry.method,
        top1(model, test),
        min(entry.times),
        len(entry.times),
        entry.count_quantizers(model),
    )


def compare(mtq: ModuleType, name: str, timing: Timing) -> list[Row]:
    torch.manual_seed(0)
    model, size, channels = MODELS[name]()
    calib = bench_models.digits("train", size, channels, batch_size=64, limit=CALIB_SAMPLES)
    test = bench_models.digits("test", size, channels)
    rows = [Row("fp32", "-", top1(model, test))]
    for method in dict.fromkeys([*THEIRS, *OURS]):  # shared methods first, in pairs
        entries = [ours(model, calib, method)] if method in OURS else []
        entries += [theirs(mtq, model, calib, method)] if method in THEIRS else []
        run_interleaved(entries, timing)
        rows += [to_row(e, test) for e in entries]
    return rows


def print_table(name: str, rows: list[Row]) -> None:
    print(f"\n{name}  (calibration {CALIB_SAMPLES} train samples, batch 64; test 360 samples)")
    print(f"{'library':10s} {'method':11s} {'top1 %':>8s} {'calib s':>9s} {'runs':>5s} {'act quantizers':>15s}")
    for r in rows:
        if r.library == "fp32":
            print(f"{r.library:10s} {r.method:11s} {r.top1:8.2f}")
        else:
            print(f"{r.library:10s} {r.method:11s} {r.top1:8.2f} {r.seconds:9.3f} {r.runs:5d} {r.act_quantizers:15d}")


def print_ratios(name: str, rows: list[Row]) -> None:
    by = {(r.library, r.method): r for r in rows}
    our_best = max((by["compress", m] for m in OURS), key=lambda r: r.top1)
    their_best = max((by["modelopt", m] for m in THEIRS), key=lambda r: r.top1)
    diff = our_best.top1 - their_best.top1
    print(
        f"{name}: our best PTQ top1 - ModelOpt best top1 = {diff:+.2f} pt "
        f"(ours {our_best.method}, theirs {their_best.method}) (target >= 0)"
    )
    for method in THEIRS:
        ratio = by["compress", method].seconds / by["modelopt", method].seconds
        print(f"{name}: our calibration time / ModelOpt's ({method}) = {ratio:.3f} (target <= 1)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=[*MODELS, "all"], default="all")
    parser.add_argument("--repeats", type=int, default=3, help="timed calibrate calls per entry (best reported)")
    parser.add_argument(
        "--budget", type=float, default=30.0, help="no new timed run once an entry's runs took this (s)"
    )
    args = parser.parse_args()
    mtq = load_modelopt()
    if mtq is None:
        print("skipped: nvidia-modelopt not installed (pip install 'compress[bench]')")
        return 0
    torch.manual_seed(0)
    timing = Timing(args.repeats, args.budget)
    names = list(MODELS) if args.model == "all" else [args.model]
    results = {}
    for name in names:
        results[name] = compare(mtq, name, timing)
        print_table(name, results[name])
    print()
    for name, rows in results.items():
        print_ratios(name, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
