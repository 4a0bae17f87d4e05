"""2:4 sparsity accuracy: dense vs 2:4 (with channel permutation), fine-tuned, then QAT; ModelOpt side by side.

usage: python benchmarks/sparsity_accuracy.py [--models resnet18 digits_cnn] [--seeds 0 1 2] [--epochs 3]
                                              [--qat-epochs 1] [--threads 2]

Models: the cached bench_models weights (``resnet18_teacher``: torchvision resnet18 on digits upscaled to
32x32 RGB, 98.61 top1; ``digits_cnn`` on 8x8 digits). top1 on the digits test split (360 images: 1 image
= 0.28 pt), evaluated like distill_accuracy.py (``compress.metrics``).

Variants (every fine-tune is ``compress.finetune``: SGD momentum 0.9, weight decay 1e-4, cosine, batch 64,
shuffled train split of 1437 images, the *last* epoch's weights (keep_best off), ``seed`` = the run's seed):
- dense FP32: the trained model.
- 2:4: ``compress.sparsity.apply_2to4(model, example_input=<one train batch>, permute=True)``, no fine-tune
  (deterministic: the same for every seed, computed once).
- 2:4 + ft: then ``--epochs`` (3) epochs at lr 0.01; the loop re-applies the masks after every step.
- 2:4 + ft + QAT: then ``quant.prepare(target="tensorrt")``, percentile calibration (99.99) on the first 512
  train images, ``--qat-epochs`` (1) epoch at lr 1e-3 with ``QatCallback``; its weights must still be 2:4
  (``verify_model``). "PTQ" (calibrated, before QAT) is shown for reference.
- 2:4 unpermuted (+ ft): ``apply_2to4`` without ``permute`` (the same masks ModelOpt computes), for
  telling the permutation's share from the masking mechanism's.
- ModelOpt: ``mts.sparsify(copy, "sparse_magnitude")`` (ASP-style magnitude 2:4 masks, no permutation; it
  needs no data), then the same fine-tune through ``compress.finetune``. ModelOpt keeps its masks by
  multiplying the weight by a mask buffer in forward (the raw parameter is not zeroed until ``mts.export``),
  so after the fine-tune the effective weights, the raw parameters, and the exported weights are checked.
Targets: 2:4+ft within 0.5 pt of dense; 2:4+ft+QAT within 0.5 pt of dense FP32; ours >= ModelOpt after the
same fine-tune (means over seeds).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

import bench_models  # noqa: E402
import modelopt_compare  # noqa: E402

import compress  # noqa: E402
import compress.metrics  # noqa: E402
from compress import ptq, quant, sparsity  # noqa: E402
from compress.data import build_loader  # noqa: E402
from compress.qat import QatCallback  # noqa: E402
from compress.recipe import DigitsData  # noqa: E402
from compress.sparsity.pattern import mask_2to4, rows, satisfies, violations  # noqa: E402

MODELS: dict[str, Callable[[], tuple[nn.Module, int, int]]] = {
    "digits_cnn": bench_models.digits_cnn,
    "resnet18": bench_models.resnet18_teacher,
}
CALIB_SAMPLES = 512
VARIANTS = ["dense FP32", "2:4 (no ft)", "2:4 + ft", "2:4 + ft + PTQ", "2:4 + ft + QAT",
            "2:4 unpermuted (no ft)", "2:4 unpermuted + ft", "ModelOpt 2:4 (no ft)", "ModelOpt 2:4 + ft"]


def load_modelopt() -> ModuleType | None:
    """``modelopt.torch.sparsity``, or None when it is not installed."""
    return modelopt_compare.load_modelopt("sparsity")


class Bench:
    def __init__(self, size: int, channels: int) -> None:
        spec = DigitsData(source="digits", split="train", size=size, channels=channels, batch_size=64)
        self.train = build_loader(spec, "digits:train", train=True)
        self.calib = bench_models.digits("train", size, channels, batch_size=64, limit=CALIB_SAMPLES)
        self.test = bench_models.digits("test", size, channels, batch_size=256)
        self.example = next(iter(bench_models.digits("train", size, channels, batch_size=64)))[0]

    def score(self, model: nn.Module) -> float:
        return 100 * compress.metrics.score("top1", compress.metrics.collect(model, self.test))["top1"]

    def fit(self, model: nn.Module, epochs: int, lr: float, seed: int, callbacks: list | None = None) -> None:
        config = compress.FinetuneConfig(epochs=epochs, lr=lr, seed=seed, keep_best=False)
        compress.finetune(model, self.train, config, callbacks=callbacks or [], progress=False, reshard=True)


class Results:
    def __init__(self) -> None:
        self.top1: dict[str, list[float]] = {v: [] for v in VARIANTS}
        self.seconds: dict[str, list[float]] = {v: [] for v in VARIANTS}

    def add(self, variant: str, top1: float, seconds: float) -> None:
        self.top1[variant].append(top1)
        self.seconds[variant].append(seconds)

    def mean(self, variant: str) -> float:
        return statistics.mean(self.top1[variant]) if self.top1[variant] else float("nan")


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def modelopt_sparsify(mts: ModuleType, model: nn.Module, bench: Bench) -> tuple[nn.Module, list[str]]:
    """ModelOpt's magnitude 2:4 on ``model`` (in place); returns it and the skipped layers' warnings."""
    config = {"data_loader": bench.calib, "collect_func": lambda b: b[0]}  # unused by sparse_magnitude
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("always")
        model = mts.sparsify(model, "sparse_magnitude", config=config)
    skipped = [str(w.message) for w in caught if "Skipping sparsifying" in str(w.message)]
    return model, skipped


def modelopt_masked(model: nn.Module) -> dict[str, nn.Module]:
    """The layers ModelOpt gave a 2:4 mask: sparse modules whose mask is set and not all ones (the layers its
    size check skips keep the all-ones mask ``modify`` allocated)."""
    from modelopt.torch.sparsity.weight_sparsity.module import SparseModule

    return {n: m for n, m in model.named_modules() if isinstance(m, SparseModule)
            and getattr(m, "_weight_mask", None) is not None and not bool(m._weight_mask.all())}


def check_modelopt(mts: ModuleType, model: nn.Module, ours: list[str], seed: int) -> None:
    """After the fine-tune: are ModelOpt's weights still 2:4, and which layers did it sparsify vs us."""
    masked = modelopt_masked(model)
    effective = [n for n, m in masked.items() if satisfies(m.weight.detach())]  # weight * mask (forward)
    raw_bad = sum(violations(m._parameters["weight"].detach()) for m in masked.values())
    raw_groups = sum(m._parameters["weight"].numel() // 4 for m in masked.values())
    exported = copy.deepcopy(model)
    with contextlib.redirect_stdout(io.StringIO()):
        exported = mts.export(exported)
    check = sparsity.verify_model(exported)
    print(f"    seed {seed} ModelOpt after ft: {len(masked)} masked layers, effective weights 2:4 in "
          f"{len(effective)}/{len(masked)}; raw parameters: {raw_bad}/{raw_groups} groups of 4 with >2 nonzeros "
          f"(masks live in forward); after mts.export: verify_model 2:4 in "
          f"{len([n for n in masked if n in check.layers and check.layers[n].is_2to4])}/{len(masked)}", flush=True)
    if set(masked) != set(ours):
        print(f"    layers only ModelOpt sparsified: {sorted(set(masked) - set(ours))}; "
              f"only ours: {sorted(set(ours) - set(masked))}")


def run_model(name: str, args: argparse.Namespace, mts: ModuleType | None) -> None:
    base, size, channels = MODELS[name]()
    bench = Bench(size, channels)
    res = Results()
    dense, t = timed(lambda: bench.score(base))
    print(f"\n{name}: dense FP32 top1 {dense:.2f}; seeds {args.seeds}; fine-tune {args.epochs} epoch(s) lr 0.01, "
          f"QAT {args.qat_epochs} epoch(s) lr 1e-3", flush=True)

    # 2:4 masks with permutation: deterministic, computed once and copied for every seed.
    sparse = copy.deepcopy(base)
    sparsifier, t_mask = timed(lambda: sparsity.apply_2to4(sparse, example_input=bench.example, permute=True))
    ours = sparsity.sparse_layers(sparse)
    report = sparsifier.report()  # type: ignore[attr-defined]
    kept = [v["retained"] for v in report["layers"].values()]
    kept_plain = [v.get("retained_unpermuted", v["retained"]) for v in report["layers"].values()]
    print(f"  ours: {len(ours)} layers 2:4 ({report['estimate'].get('eligible_macs_share')} of Conv/Linear MACs), "
          f"skipped {report['skipped']}; mean retained |w| {statistics.mean(kept):.4f} "
          f"(unpermuted {statistics.mean(kept_plain):.4f}); apply_2to4 {t_mask:.1f} s", flush=True)
    sparse_top1 = bench.score(sparse)
    unpermuted = copy.deepcopy(base)
    _, t_unperm = timed(lambda: sparsity.apply_2to4(unpermuted, example_input=bench.example))
    unpermuted_top1 = bench.score(unpermuted)
    if mts is not None:
        probe, skipped = modelopt_sparsify(mts, copy.deepcopy(base), bench)
        masked = modelopt_masked(probe)
        same = sum(int((rows(m._weight_mask) == rows(mask_2to4(base.get_submodule(n).weight))).reshape(-1, 4)
                       .all(1).sum()) for n, m in masked.items())
        total = sum(m._weight_mask.numel() // 4 for m in masked.values())
        skipped_names = [s.split(" of size")[0].replace("Skipping sparsifying ", "") for s in skipped]
        print(f"  ModelOpt sparse_magnitude: {len(masked)} layers masked; skipped: {skipped_names}; "
              f"same layers as ours: {set(masked) == set(ours)}; masks identical to our unpermuted 2:4 masks "
              f"in {same}/{total} groups of 4", flush=True)
        del probe

    for seed in args.seeds:
        res.add("dense FP32", dense, t)
        res.add("2:4 (no ft)", sparse_top1, t_mask)
        ft = copy.deepcopy(sparse)
        _, t_ft = timed(lambda: bench.fit(ft, args.epochs, 0.01, seed))  # noqa: B023
        res.add("2:4 + ft", bench.score(ft), t_ft)
        missing_ft = sparsity.verify_model(ft).missing(ours)

        qmodel = quant.prepare(copy.deepcopy(ft), target="tensorrt")
        _, t_cal = timed(lambda: ptq.calibrate(qmodel, bench.calib, "percentile", limit=CALIB_SAMPLES))  # noqa: B023
        res.add("2:4 + ft + PTQ", bench.score(qmodel), t_cal)
        _, t_qat = timed(lambda: bench.fit(qmodel, args.qat_epochs, 1e-3, seed, [QatCallback()]))  # noqa: B023
        res.add("2:4 + ft + QAT", bench.score(qmodel), t_cal + t_qat)
        check = sparsity.verify_model(qmodel)
        print(f"    seed {seed}: 2:4+ft {res.top1['2:4 + ft'][-1]:.2f} ({t_ft:.0f} s; 2:4 layers missing after "
              f"ft: {missing_ft or 'none'}); QAT {res.top1['2:4 + ft + QAT'][-1]:.2f} ({t_cal + t_qat:.0f} s); "
              f"QAT model verify_model: {len(check.sparse_layers)} sparse layers, missing vs ours: "
              f"{check.missing(ours) or 'none'}", flush=True)

        res.add("2:4 unpermuted (no ft)", unpermuted_top1, t_unperm)
        plain = copy.deepcopy(unpermuted)
        _, t_plain = timed(lambda: bench.fit(plain, args.epochs, 0.01, seed))  # noqa: B023
        res.add("2:4 unpermuted + ft", bench.score(plain), t_plain)

        if mts is not None:
            mo = copy.deepcopy(base)
            (mo, _), t_mo = timed(lambda: modelopt_sparsify(mts, mo, bench))  # type: ignore[misc]  # noqa: B023
            res.add("ModelOpt 2:4 (no ft)", bench.score(mo), t_mo)
            _, t_mo_ft = timed(lambda: bench.fit(mo, args.epochs, 0.01, seed))  # noqa: B023
            res.add("ModelOpt 2:4 + ft", bench.score(mo), t_mo_ft)
            print(f"    seed {seed}: ModelOpt 2:4+ft {res.top1['ModelOpt 2:4 + ft'][-1]:.2f} ({t_mo_ft:.0f} s); "
                  f"ours unpermuted 2:4+ft {res.top1['2:4 unpermuted + ft'][-1]:.2f} ({t_plain:.0f} s)", flush=True)
            check_modelopt(mts, mo, ours, seed)
    print_table(name, res, args.seeds, mts is not None)


def print_table(name: str, res: Results, seeds: list[int], with_modelopt: bool) -> None:
    print(f"\n{name}  top1 % per seed {seeds}, mean, mean seconds per run (mask / fine-tune / calibrate+QAT)")
    print(f"  {'variant':<24} " + " ".join(f"{'s' + str(s):>6}" for s in seeds) + f" {'mean':>7} {'seconds':>8}")
    for v in VARIANTS:
        if not res.top1[v]:
            continue
        print(f"  {v:<24} " + " ".join(f"{x:6.2f}" for x in res.top1[v])
              + f" {res.mean(v):7.2f} {statistics.mean(res.seconds[v]):8.1f}")
    if not with_modelopt:
        print("  (ModelOpt column skipped: nvidia-modelopt not importable)")
    dense = res.mean("dense FP32")
    ft, qat = res.mean("2:4 + ft"), res.mean("2:4 + ft + QAT")
    print(f"  target 2:4+ft within 0.5 pt of dense: dense - 2:4+ft = {dense - ft:+.2f} pt -> "
          f"{'met' if dense - ft <= 0.5 else 'NOT met'}")
    print(f"  target 2:4+ft+QAT within 0.5 pt of dense FP32: dense - QAT = {dense - qat:+.2f} pt -> "
          f"{'met' if dense - qat <= 0.5 else 'NOT met'}")
    if with_modelopt:
        mo = res.mean("ModelOpt 2:4 + ft")
        print(f"  target ours >= ModelOpt after the same fine-tune: ours - ModelOpt = {ft - mo:+.2f} pt -> "
              f"{'met' if ft >= mo else 'NOT met'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["resnet18"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--qat-epochs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-modelopt", action="store_true", help="skip the ModelOpt column")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    mts = None if args.no_modelopt else load_modelopt()
    if mts is None and not args.no_modelopt:
        print("ModelOpt: nvidia-modelopt is not importable (pip install 'compress[bench]'); its column is skipped")
    start = time.perf_counter()
    for name in args.models:
        run_model(name, args, mts)
    print(f"\ntotal wall time {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
