"""Pruning accuracy: top1 against MACs for our channel and L1 pruning vs Torch-Pruning's and torch's own flows.

usage: python benchmarks/prune_accuracy.py [--models digits_cnn resnet18] [--epochs-cnn 3] [--epochs-resnet 3]
                                           [--lr 0.01] [--reduction 2.0] [--sparsity 0.8] [--threads 1]

Models: the cached bench_models weights: digits_cnn (8x8 digits, 1 channel) and torchvision resnet18
(num_classes 10, digits upscaled to 32x32 RGB). top1 on the digits test split (360 images). Every
fine-tune is ``compress.finetune`` with SGD (momentum 0.9, weight decay 1e-4), cosine, ``--lr``, seed 0,
on the shuffled train split (1437 images, batch 64) and keep_best on the test top1, as the recipe's
prune stage does; both sides of every comparison get the same (optimistic) epoch pick. E is
``--epochs-cnn`` / ``--epochs-resnet``.

Channel pruning to ``--reduction`` x fewer MACs (MACs: ``compress.profile.count_macs``, Conv/Linear):
  (a) unpruned; "drop pt" is against this row. Control: the unpruned model fine-tuned 2E epochs the
      same way, since the cached resnet18 is trained only briefly and more epochs alone may add top1.
  (b) ours: one ``ChannelPruner`` (l1, local): ``prune_to_macs(reduction ** 0.5)``, fine-tune E epochs,
      ``prune_to_macs(reduction)`` (both measured against the MACs before the first step), fine-tune E.
  (b') ours one-shot: ``prune_to_macs(reduction)`` once, then 2E epochs (like for like with (c)).
  (c) Torch-Pruning 1.6: ``tp.pruner.MagnitudePruner`` (GroupMagnitudeImportance p=1, local, the head
      ignored, round_to None), one step at the smallest pruning_ratio whose MACs are <= ours' final
      MACs (bisected on copies), then 2E epochs in one go.
L1 unstructured to ``--sparsity`` of the Conv/Linear weights (the same layers on both sides):
  (d) ours: ``l1_unstructured(scope=global, Schedule(8, 0.2, sparsity, cubic))``, 2E epochs with
      ``pruner.callback()``, ``make_permanent()``.
  (e) torch: ``prune.global_unstructured(.., L1Unstructured, amount=sparsity)`` one-shot, the same 2E
      epochs (masks held by torch's forward pre-hooks), ``prune.remove``.
  Sparsity is counted from the final weights (zeros / weights of the pruned layers).
Target: (b) within 0.5 pt of (a) at >= 2x MACs reduction. (b) vs (c) and (d) vs (e) are reported.
Torch runs on ``--threads`` intra-op threads (default 1: accuracy does not depend on it, and one thread
suffers least when other work shares the CPU); the time column is wall-clock per flow, for orientation.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch_pruning as tp
from torch import nn
from torch.nn.utils import prune as torch_prune
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))

import bench_models  # noqa: E402

import compress  # noqa: E402
import compress.metrics  # noqa: E402
import compress.prune  # noqa: E402
from compress.data import build_loader  # noqa: E402
from compress.models import count_nonzero_params, count_params  # noqa: E402
from compress.profile import count_macs  # noqa: E402
from compress.prune.unstructured import weighted_layers  # noqa: E402
from compress.recipe import DigitsData  # noqa: E402

MODELS = {"digits_cnn": bench_models.digits_cnn, "resnet18": bench_models.resnet18}


@dataclass
class Row:
    model: str
    method: str
    top1: float
    params: int
    nonzero: int
    macs: int
    macs_reduction: float
    sparsity: float | None  # zeros / weights of the pruned Conv/Linear layers (L1 rows)
    seconds: float
    note: str = ""


class Bench:
    """Data, scoring and fine-tuning for one model, shared by every flow."""

    def __init__(self, name: str, size: int, channels: int, epochs: int, lr: float) -> None:
        self.name, self.epochs, self.lr = name, epochs, lr
        spec = DigitsData(source="digits", split="train", size=size, channels=channels, batch_size=64)
        self.train: DataLoader = build_loader(spec, "digits:train", train=True)  # shuffled, as a recipe's train split
        self.test = bench_models.digits("test", size, channels, batch_size=256)
        self.example = torch.zeros(1, channels, size, size)

    def score(self, model: nn.Module) -> float:
        return compress.metrics.score("top1", compress.metrics.collect(model, self.test))["top1"]

    def finetune(self, model: nn.Module, epochs: int, callbacks: tuple = ()) -> compress.FinetuneResult:
        config = compress.FinetuneConfig(epochs=epochs, lr=self.lr, seed=0)
        return compress.finetune(model, self.train, config, evaluate=self.score, callbacks=callbacks, progress=False, reshard=True)

    def row(self, method: str, model: nn.Module, macs0: int, start: float, sparsity: float | None = None,
            note: str = "") -> Row:
        macs = count_macs(model, self.example)
        return Row(self.name, method, self.score(model), count_params(model), count_nonzero_params(model), macs,
                   macs0 / macs, sparsity, time.perf_counter() - start, note)


def unpruned_finetuned(bench: Bench, base: nn.Module) -> Row:
    start = time.perf_counter()
    model = copy.deepcopy(base)
    torch.manual_seed(0)
    result = bench.finetune(model, 2 * bench.epochs)
    return bench.row("unpruned + 2E ft (ctrl)", model, count_macs(base, bench.example), start, note=history(result))


def head_of(model: nn.Module) -> nn.Module:
    return model.fc  # digits_cnn and torchvision resnet18 both end in .fc


def history(result: compress.FinetuneResult) -> str:
    scores = "/".join(f"{h['score']:.3f}" for h in result.history)
    return f"ft {scores} best@{result.best_epoch}"


def ours_channels(bench: Bench, base: nn.Module, reduction: float, steps: int) -> tuple[Row, float]:
    """Ours in ``steps`` steps to ``reduction``, 2E/steps fine-tune epochs after each (2E in all)."""
    start = time.perf_counter()
    model = copy.deepcopy(base)
    torch.manual_seed(0)
    pruner = compress.prune.ChannelPruner(model, bench.example, compress.prune.ChannelOptions(), where="bench")
    notes = []
    for k in range(1, steps + 1):
        ratio, _ = pruner.prune_to_macs(reduction ** (k / steps))
        pruned = bench.score(model)
        result = bench.finetune(model, 2 * bench.epochs // steps)
        notes.append(f"r={ratio:.3f} pruned {pruned:.3f} {history(result)}")
    pruner.finish()
    label = "ours channel one-shot" if steps == 1 else f"ours channel {steps}-step"
    return bench.row(label, model, pruner.macs_before, start, note="; ".join(notes)), ratio


def tp_prune(base: nn.Module, example: torch.Tensor, ratio: float) -> nn.Module:
    model = copy.deepcopy(base).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.MagnitudePruner(model, example, importance=tp.importance.GroupMagnitudeImportance(p=1),
                                           pruning_ratio=ratio, ignored_layers=[head_of(model)], round_to=None)
        pruner.step()
    return model


def tp_channels(bench: Bench, base: nn.Module, max_macs: int) -> Row:
    """Torch-Pruning one-shot at the smallest ratio with MACs <= ``max_macs``, then 2E epochs."""
    start = time.perf_counter()
    low, high = 0.0, 0.99
    while high - low > 1 / 512:  # MACs fall as the ratio rises
        mid = (low + high) / 2
        low, high = (mid, high) if count_macs(tp_prune(base, bench.example, mid), bench.example) > max_macs else (low, mid)
    torch.manual_seed(0)
    model = tp_prune(base, bench.example, high)
    pruned = bench.score(model)
    result = bench.finetune(model, 2 * bench.epochs)
    ops, _ = tp.utils.count_ops_and_params(model, bench.example)
    return bench.row("Torch-Pruning one-shot", model, count_macs(base, bench.example), start,
                     note=f"r={high:.3f} pruned {pruned:.3f} {history(result)} tp_ops={ops / 1e6:.2f}M")


def weight_sparsity(model: nn.Module, names: list[str]) -> float:
    weights = [model.get_submodule(n).weight for n in names]
    total = sum(w.numel() for w in weights)
    return 1 - sum(int(torch.count_nonzero(w)) for w in weights) / total


def ours_l1(bench: Bench, base: nn.Module, sparsity: float) -> Row:
    start = time.perf_counter()
    model = copy.deepcopy(base)
    torch.manual_seed(0)
    schedule = compress.prune.Schedule(steps=8, start_ratio=0.2, end_ratio=sparsity, curve="cubic")
    pruner = compress.prune.l1_unstructured(model, schedule=schedule, scope="global")
    result = bench.finetune(model, 2 * bench.epochs, callbacks=(pruner.callback(),))
    stats = pruner.make_permanent()
    true = weight_sparsity(model, weighted_layers(model))
    return bench.row("ours L1 gradual", model, count_macs(base, bench.example), start, true,
                     note=f"{history(result)} stats.sparsity={stats['sparsity']:.4f}")


def torch_l1(bench: Bench, base: nn.Module, sparsity: float) -> Row:
    start = time.perf_counter()
    model = copy.deepcopy(base)
    torch.manual_seed(0)
    names = weighted_layers(model)
    params = [(model.get_submodule(n), "weight") for n in names]
    torch_prune.global_unstructured(params, pruning_method=torch_prune.L1Unstructured, amount=sparsity)
    pruned = bench.score(model)
    result = bench.finetune(model, 2 * bench.epochs)
    for module, name in params:
        torch_prune.remove(module, name)
    true = weight_sparsity(model, names)
    return bench.row("torch L1 one-shot", model, count_macs(base, bench.example), start, true,
                     note=f"pruned {pruned:.3f} {history(result)}")


def print_table(rows: list[Row]) -> None:
    print(f"{'model':10s} {'method':24s} {'top1':>7s} {'drop pt':>8s} {'params':>10s} {'nonzero':>10s} "
          f"{'MACs':>11s} {'MACs red':>8s} {'sparsity':>8s} {'time s':>7s}")
    base = {r.model: r.top1 for r in rows if r.method == "unpruned"}
    for r in rows:
        sparsity = f"{r.sparsity:8.4f}" if r.sparsity is not None else f"{'-':>8s}"
        drop = 100 * (base[r.model] - r.top1)
        print(f"{r.model:10s} {r.method:24s} {r.top1:7.4f} {drop:8.2f} {r.params:10,d} {r.nonzero:10,d} "
              f"{r.macs:11,d} {r.macs_reduction:7.3f}x {sparsity} {r.seconds:7.1f}")
    print("notes (ratio, top1 right after pruning, top1 after each fine-tune epoch, epoch kept):")
    for r in rows:
        if r.note:
            print(f"  {r.model:10s} {r.method:24s} {r.note}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--epochs-cnn", type=int, default=3, help="E for digits_cnn")
    parser.add_argument("--epochs-resnet", type=int, default=3, help="E for resnet18")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--reduction", type=float, default=2.0, help="channel pruning MACs reduction target")
    parser.add_argument("--sparsity", type=float, default=0.8, help="L1 unstructured sparsity")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    print(f"torch {torch.__version__}, torch_pruning {tp.__version__}, {args.threads} threads, "
          f"load average at start {os.getloadavg()[0]:.2f}")
    rows: list[Row] = []
    lines: list[str] = []
    for name in args.models:
        t0 = time.perf_counter()
        base, size, channels = MODELS[name]()
        epochs = args.epochs_cnn if name == "digits_cnn" else args.epochs_resnet
        bench = Bench(name, size, channels, epochs, args.lr)
        base.eval()
        unpruned = bench.row("unpruned", base, count_macs(base, bench.example), t0)
        control = unpruned_finetuned(bench, base)
        ours, _ = ours_channels(bench, base, args.reduction, steps=2)
        ours_once, _ = ours_channels(bench, base, args.reduction, steps=1)
        theirs = tp_channels(bench, base, ours.macs)
        l1_ours = ours_l1(bench, base, args.sparsity)
        l1_torch = torch_l1(bench, base, args.sparsity)
        rows += [unpruned, control, ours, ours_once, theirs, l1_ours, l1_torch]
        print(f"{name}: {size}x{size}x{channels}, E={epochs}, lr {args.lr} ({time.perf_counter() - t0:.0f} s)")
        drop = 100 * (unpruned.top1 - ours.top1)
        ok = drop <= 0.5 and ours.macs_reduction >= args.reduction
        lines += [
            f"{name}: ours channel drop = {drop:.2f} pt at {ours.macs_reduction:.3f}x MACs "
            f"(target <= 0.5 pt at >= {args.reduction:g}x: {'met' if ok else 'NOT met'})",
            f"{name}: ours channel vs unpruned + {2 * epochs} ft epochs = {100 * (ours.top1 - control.top1):+.2f} pt",
            f"{name}: ours - Torch-Pruning (channel) = {100 * (ours.top1 - theirs.top1):+.2f} pt 2-step, "
            f"{100 * (ours_once.top1 - theirs.top1):+.2f} pt one-shot (MACs ours / theirs = {ours.macs / theirs.macs:.3f})",
            f"{name}: ours - torch (L1 {args.sparsity:g}) = {100 * (l1_ours.top1 - l1_torch.top1):+.2f} pt "
            f"(sparsity {l1_ours.sparsity:.4f} vs {l1_torch.sparsity:.4f})",
        ]
    print()
    print_table(rows)
    print()
    for line in lines:
        print(line)
    print(f"(benchmark wall time {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
