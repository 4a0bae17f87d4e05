"""Distillation accuracy: KD vs plain training at equal epochs, mean over seeds.

usage: python benchmarks/distill_accuracy.py [--parts student pruned] [--models digits_cnn resnet18]
                                             [--seeds 0 1 2] [--epochs 15] [--limit N]
                                             [--regimes all:3 all:1 300:10] [--threads 1]

Teachers: the cached bench_models weights (digits_cnn on 8x8 digits; ``resnet18_teacher``: torchvision
resnet18, num_classes 10, digits upscaled to 32x32 RGB, 10 shuffled epochs). top1 on the digits test split (360 images: 1 image = 0.28 pt).
Every run is ``compress.finetune`` (SGD momentum 0.9, weight decay 1e-4, cosine, batch 64, shuffled
train split of 1437 images, or fewer where said), the *last* epoch's weights (keep_best off, so
no test-set epoch picking), seeds 0,1,2 for init and data order. KD: ``Distiller(temperature=4,
alpha=0.7)`` as a callback, the teacher live (no cache).

student: digits_cnn at width 22 (0.47x the teacher's MACs) trained from scratch for ``--epochs``
  (lr 0.05) on the first ``--limit`` train images (default all): plain cross-entropy vs KD vs KD + a
  layer2 hint (1x1 projection 44->64, weight 0.5).
  Target: KD >= plain + 0.5 pt, or KD within 0.5 pt of the teacher.
pruned: each model channel-pruned to 2x fewer MACs (``prune_to_macs(2.0)``, l1, local), then fine-tuned
  (lr 0.01) plain vs KD from the unpruned model, in each ``--regimes`` budget: all 1437 images for 3
  epochs, all for 1 epoch, the first 300 images for 10 epochs (``--limit`` does not apply here).
  Target: KD recovers at least as much as plain.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

import bench_models  # noqa: E402

import compress  # noqa: E402
import compress.metrics  # noqa: E402
from compress.data import build_loader  # noqa: E402
from compress.distill import Distiller  # noqa: E402
from compress.profile import count_macs  # noqa: E402
from compress.prune import ChannelOptions, ChannelPruner  # noqa: E402
from compress.recipe import DigitsData  # noqa: E402

MODELS = {"digits_cnn": bench_models.digits_cnn, "resnet18": bench_models.resnet18_teacher}


class Bench:
    def __init__(self, size: int, channels: int, limit: int | None) -> None:
        spec = DigitsData(source="digits", split="train", size=size, channels=channels, batch_size=64, limit=limit)
        self.train = build_loader(spec, "digits:train", train=True)
        self.test = bench_models.digits("test", size, channels, batch_size=256)
        self.example = torch.zeros(1, channels, size, size)

    def score(self, model: nn.Module) -> float:
        return compress.metrics.score("top1", compress.metrics.collect(model, self.test))["top1"]

    def fit(self, model: nn.Module, epochs: int, lr: float, seed: int, teacher: nn.Module | None,
            hints: dict[str, str] | None = None) -> float:
        config = compress.FinetuneConfig(epochs=epochs, lr=lr, seed=seed, keep_best=False)
        callbacks = []
        kd = None
        if teacher is not None:
            kd = Distiller(model, teacher, temperature=4.0, alpha=0.7, hints=hints, hint_weight=0.5,
                           example_input=self.example)
            callbacks.append(kd.callback())
        try:
            compress.finetune(model, self.train, config, callbacks=callbacks, progress=False, reshard=True)
        finally:
            if kd is not None:
                kd.close()
        return self.score(model)


def runs(label: str, make: Callable[[int], float], seeds: list[int]) -> tuple[str, list[float]]:
    start = time.perf_counter()
    scores = [make(seed) for seed in seeds]
    print(f"  {label:<34} " + " ".join(f"{100 * s:6.2f}" for s in scores)
          + f"   mean {100 * statistics.mean(scores):6.2f}   ({time.perf_counter() - start:.0f} s)", flush=True)
    return label, scores


def student_part(args: argparse.Namespace) -> None:
    teacher, size, channels = bench_models.digits_cnn()
    bench = Bench(size, channels, args.limit)
    t_score = bench.score(teacher)
    ratio = count_macs(compress.build("compress.zoo:digits_cnn", {"width": 22}), bench.example) / count_macs(teacher, bench.example)
    print(f"\nstudent: digits_cnn width 22 ({ratio:.2f}x MACs) from scratch, {args.epochs} epochs; "
          f"teacher digits_cnn {100 * t_score:.2f}; top1 % per seed {args.seeds}")

    def student(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return compress.build("compress.zoo:digits_cnn", {"width": 22})

    results = dict([
        runs("plain (cross-entropy)", lambda s: bench.fit(student(s), args.epochs, 0.05, s, None), args.seeds),
        runs("KD T=4 alpha=0.7", lambda s: bench.fit(student(s), args.epochs, 0.05, s, teacher), args.seeds),
        runs("KD + layer2 hint", lambda s: bench.fit(student(s), args.epochs, 0.05, s, teacher, {"layer2": "layer2"}),
             args.seeds),
    ])
    plain = statistics.mean(results["plain (cross-entropy)"])
    kd = statistics.mean(results["KD T=4 alpha=0.7"])
    gain, gap = 100 * (kd - plain), 100 * (t_score - kd)
    met = gain >= 0.5 or gap <= 0.5
    print(f"  KD - plain = {gain:+.2f} pt; teacher - KD = {gap:+.2f} pt -> target {'met' if met else 'NOT met'}")


def pruned_part(args: argparse.Namespace) -> None:
    for name in args.models:
        base, size, channels = MODELS[name]()
        for regime in args.regimes:
            limit_text, epochs_text = regime.split(":")
            limit = None if limit_text == "all" else int(limit_text)
            pruned_regime(name, base, Bench(size, channels, limit), int(epochs_text), args.seeds)


def pruned_regime(name: str, base: nn.Module, bench: Bench, epochs: int, seeds: list[int]) -> None:
    pruned = copy.deepcopy(base)
    pruner = ChannelPruner(pruned, bench.example, ChannelOptions(), where="bench")
    pruner.prune_to_macs(2.0)
    pruner.finish()
    reduction = pruner.macs_before / count_macs(pruned, bench.example)
    print(f"\npruned: {name} {100 * bench.score(base):.2f} -> {reduction:.2f}x fewer MACs "
          f"({100 * bench.score(pruned):.2f} before fine-tune); {epochs} epoch(s) on "
          f"{len(bench.train.dataset)} train images; top1 % per seed {seeds}")  # type: ignore[arg-type]
    results = dict([
        runs("pruned + plain fine-tune", lambda s: bench.fit(copy.deepcopy(pruned), epochs, 0.01, s, None), seeds),
        runs("pruned + KD (teacher: unpruned)", lambda s: bench.fit(copy.deepcopy(pruned), epochs, 0.01, s, base),
             seeds),
    ])
    plain, kd = (statistics.mean(v) for v in results.values())
    print(f"  KD - plain = {100 * (kd - plain):+.2f} pt -> target {'met' if kd >= plain else 'NOT met'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", nargs="+", choices=["student", "pruned"], default=["student", "pruned"])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["digits_cnn", "resnet18"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--regimes", nargs="+", default=["all:3", "all:1", "300:10"],
                        help="pruned part: TRAIN_IMAGES:EPOCHS pairs ('all' = the 1437 train images)")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if "student" in args.parts:
        student_part(args)
    if "pruned" in args.parts:
        pruned_part(args)


if __name__ == "__main__":
    main()
