"""INT8 PTQ side by side with NVIDIA ModelOpt: top-1 and calibration wall time on the same model and data.

usage: python benchmarks/modelopt_compare.py [--model digits_cnn|resnet18|all] [--repeats 3] [--slow 15]
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
Calibration time: wall time of the whole calibrate call, best of ``--repeats`` runs (3), each on a freshly
prepared copy (insertion not timed, for either library); a run longer than ``--slow`` (15 s) is not
repeated, to keep the script under ~5 minutes ("runs" column). top-1: digits test split (360 samples).
Placement differs a little: ours (TensorRT rules) quantizes Conv/Linear inputs and the residual
input of each add; ModelOpt's INT8 config quantizes Conv/Linear and pooling inputs, not adds.
Targets: our best PTQ top-1 - ModelOpt's best >= 0 pt; our calibration time / ModelOpt's <= 1
for the same method (max, entropy).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import logging
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Timing:
    repeats: int
    slow: float  # seconds; a run this long is not repeated (its noise is small next to it)


@dataclass
class Row:
    library: str
    method: str
    top1: float  # percent
    seconds: float
    runs: int  # timed calibrate calls (the best is reported)
    act_quantizers: int


def load_modelopt() -> ModuleType | None:
    """``modelopt.torch.quantization``, or None when it is not installed (import noise silenced)."""
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import modelopt.torch.quantization as mtq
    except ImportError:
        return None
    warnings.filterwarnings("ignore", message="Cannot find transformers package")  # raised lazily, harmless here
    return mtq


def top1(model: nn.Module, loader: DataLoader) -> float:
    """Top-1 accuracy in percent."""
    return 100.0 * compress.metrics.score("top1", compress.metrics.collect(model, loader))["top1"]


def timed_calibration(
    setup: Callable[[], nn.Module], calibrate: Callable[[nn.Module], object], repeats: int, slow: float
) -> tuple[float, int, nn.Module]:
    """Best wall time of ``calibrate`` over up to ``repeats`` runs, each on a fresh ``setup()`` model
    (untimed); stops after a run longer than ``slow`` seconds. Returns ``(seconds, runs, last model)``."""
    times: list[float] = []
    while len(times) < repeats and not (times and times[-1] > slow):
        model = setup()
        start = time.perf_counter()
        calibrate(model)
        times.append(time.perf_counter() - start)
    return min(times), len(times), model


# ----------------------------------------------------------------------------------------------
# ours


def ours(model: nn.Module, calib: DataLoader, test: DataLoader, method: str, timing: Timing) -> Row:
    seconds, runs, qmodel = timed_calibration(
        lambda: quant.prepare(copy.deepcopy(model), "tensorrt"),
        lambda q: ptq.calibrate(q, calib, method, limit=CALIB_SAMPLES),
        timing.repeats,
        timing.slow,
    )
    acts = sum(1 for _, q in quant.quantizers(qmodel) if q.spec.axis is None and q.quant_enabled)
    return Row("compress", method, top1(qmodel, test), seconds, runs, acts)


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


def forward_loop(calib: DataLoader) -> Callable[[nn.Module], None]:
    def run(model: nn.Module) -> None:
        for x, _ in calib:
            model(x)

    return run


def entropy_calibrate(model: nn.Module, loop: Callable[[nn.Module], None]) -> None:
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


def max_calibrate(mtq: ModuleType, model: nn.Module, loop: Callable[[nn.Module], None]) -> None:
    mtq.calibrate(model, algorithm="max", forward_loop=loop)


def modelopt_act_quantizers(model: nn.Module) -> int:
    from modelopt.torch.quantization.nn import TensorQuantizer

    return sum(
        1 for _, q in model.named_modules() if isinstance(q, TensorQuantizer) and q.is_enabled and q.axis is None
    )


def theirs(mtq: ModuleType, model: nn.Module, calib: DataLoader, test: DataLoader, method: str, timing: Timing) -> Row:
    loop = forward_loop(calib)

    def calibrate(qmodel: nn.Module) -> None:
        if method == "max":
            max_calibrate(mtq, qmodel, loop)
        else:
            entropy_calibrate(qmodel, loop)

    seconds, runs, qmodel = timed_calibration(
        lambda: modelopt_prepare(mtq, model, method), calibrate, timing.repeats, timing.slow
    )
    return Row("modelopt", method, top1(qmodel, test), seconds, runs, modelopt_act_quantizers(qmodel))


# ----------------------------------------------------------------------------------------------
# report


def compare(mtq: ModuleType, name: str, timing: Timing) -> list[Row]:
    torch.manual_seed(0)
    model, size, channels = MODELS[name]()
    calib = bench_models.digits("train", size, channels, batch_size=64, limit=CALIB_SAMPLES)
    test = bench_models.digits("test", size, channels)
    rows = [Row("fp32", "-", top1(model, test), float("nan"), 0, 0)]
    rows += [ours(model, calib, test, method, timing) for method in OURS]
    rows += [theirs(mtq, model, calib, test, method, timing) for method in THEIRS]
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
    parser.add_argument("--slow", type=float, default=15.0, help="stop repeating after a run longer than this (s)")
    args = parser.parse_args()
    timing = Timing(args.repeats, args.slow)
    mtq = load_modelopt()
    if mtq is None:
        print("skipped: nvidia-modelopt not installed (pip install 'compress[bench]')")
        return 0
    torch.manual_seed(0)
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
