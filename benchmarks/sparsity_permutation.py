"""2:4 channel permutation: how much of the magnitude 2:4 masking drops does our permutation win back?

usage: python benchmarks/sparsity_permutation.py [--models resnet18 digits_cnn] [--threads 2]

Models: the cached bench_models weights (``resnet18_teacher``: torchvision resnet18 on digits 32x32 RGB;
``digits_cnn`` on 8x8 digits). For every layer ``apply_2to4`` makes 2:4 (eligible Conv/Linear layers),
the share of the layer's ``sum |w|`` kept by
- plain: the 2:4 magnitude mask without permutation (``retained_unpermuted`` in the report; checked against
  ``pattern.retained`` on the original weight),
- perm: the 2:4 mask after our channel permutation (``apply_2to4(copy, example_input=<one train batch of 64>,
  permute=True)``, its ``retained``),
- unstructured: 50% unstructured magnitude pruning of the layer (the top half of |w|), the upper bound,
and recovered = (perm - plain) / (unstructured - plain), the share of the gap the permutation closes.
"overall" weighs layers by their sum |w| (a permutation does not change it).
Timing: ``apply_2to4`` wall time with and without ``permute``, and the time spent in
``permute.search`` itself (wrapped here; the rest is tracing, reordering and the output check).
Equivalence: the permutation alone (``permute.permute_groups``, no masks) must leave the model's outputs
unchanged: max abs logit difference on the 360 test images, eval mode.
Target: the permutation recovers a measurable share of the gap: overall recovered >= 1% and no layer worse.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

import bench_models  # noqa: E402

from compress import sparsity  # noqa: E402
from compress.data import stack_inputs  # noqa: E402
from compress.sparsity import permute  # noqa: E402
from compress.sparsity.masks import plan  # noqa: E402
from compress.sparsity.pattern import retained  # noqa: E402

MODELS: dict[str, Callable[[], tuple[nn.Module, int, int]]] = {
    "digits_cnn": bench_models.digits_cnn,
    "resnet18": bench_models.resnet18_teacher,
}
MEASURABLE = 0.01  # overall share of the gap


def unstructured_half(weight: torch.Tensor) -> float:
    """Share of ``sum |w|`` kept by keeping the largest half of |w| (no pattern constraint)."""
    mags = weight.detach().abs().float().flatten()
    total = float(mags.sum())
    return float(torch.topk(mags, mags.numel() // 2).values.sum()) / total if total else 1.0


class SearchTimer:
    """Wraps ``permute.search`` (looked up at call time by ``permute_groups``) to add up its wall time."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0
        self._original = permute.search

    def __enter__(self) -> SearchTimer:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return self._original(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
                self.calls += 1

        permute.search = timed  # type: ignore[assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        permute.search = self._original  # type: ignore[assignment]


def gap_share(plain: float, perm: float, bound: float) -> float:
    return (perm - plain) / (bound - plain) if bound > plain else float("nan")


def run_model(name: str) -> bool:
    base, size, channels = MODELS[name]()
    base.eval()
    example = next(iter(bench_models.digits("train", size, channels, batch_size=64)))[0]
    test_x, _ = stack_inputs(bench_models.digits("test", size, channels, batch_size=360))

    chosen = plan(copy.deepcopy(base), example, (), (), "bench")
    plain_copy = copy.deepcopy(base)
    start = time.perf_counter()
    sparsity.apply_2to4(plain_copy, example_input=example)
    t_plain = time.perf_counter() - start

    perm_copy = copy.deepcopy(base)
    with SearchTimer() as timer:
        start = time.perf_counter()
        report = sparsity.apply_2to4(perm_copy, example_input=example, permute=True).report()
        t_perm = time.perf_counter() - start

    print(f"\n{name}: {len(chosen)} layers 2:4; share of each layer's sum |w| kept (%)")
    print(f"  {'layer':<24} {'shape':<18} {'|w| share':>9} {'plain':>7} {'perm':>7} {'unstr.':>7} {'recovered':>9}")
    sums = {n: float(base.get_submodule(n).weight.detach().abs().sum()) for n in chosen}
    grand = sum(sums.values())
    totals = {"plain": 0.0, "perm": 0.0, "bound": 0.0}
    worse = []
    mismatch = []
    for n in chosen:
        w = base.get_submodule(n).weight
        entry = report["layers"][n]
        plain = retained(w)
        if abs(entry.get("retained_unpermuted", plain) - plain) > 1e-5:
            mismatch.append(n)
        perm = entry["retained"]
        bound = unstructured_half(w)
        if perm < plain - 1e-6:
            worse.append(n)
        for key, value in (("plain", plain), ("perm", perm), ("bound", bound)):
            totals[key] += value * sums[n] / grand
        print(f"  {n:<24} {str(list(w.shape)):<18} {100 * sums[n] / grand:8.2f}% {100 * plain:7.2f} {100 * perm:7.2f} "
              f"{100 * bound:7.2f} {100 * gap_share(plain, perm, bound):8.1f}%")
    overall = gap_share(totals["plain"], totals["perm"], totals["bound"])
    print(f"  {'overall (|w|-weighted)':<24} {'':<18} {100.0:8.2f}% {100 * totals['plain']:7.2f} "
          f"{100 * totals['perm']:7.2f} {100 * totals['bound']:7.2f} {100 * overall:8.1f}%")
    if mismatch:
        print(f"  note: report's retained_unpermuted differs from pattern.retained(original weight) for {mismatch}")
    swaps = sum(p["swaps"] for p in report["permutations"])
    skipped = {p["root"]: p["skipped"] for p in report["permutations"] if p.get("skipped")}
    print(f"  time: apply_2to4 {t_plain:.2f} s plain, {t_perm:.2f} s with permute (+{t_perm - t_plain:.2f} s); "
          f"permute.search {timer.seconds:.2f} s in {timer.calls} calls, {swaps} swaps over "
          f"{len(report['permutations'])} channel groups; groups skipped: {skipped or 'none'}")

    # The permutation alone must not change what the model computes.
    only = copy.deepcopy(base)
    permute.permute_groups(only, example, set(chosen), "bench")
    with torch.no_grad():
        ref, out = base(test_x), only.eval()(test_x)
    diff = float((out - ref).abs().max())
    same_pred = float((out.argmax(1) == ref.argmax(1)).float().mean())
    pairs = zip(base.state_dict().values(), only.state_dict().values(), strict=True)
    moved = sum(not torch.equal(a, b) for a, b in pairs)
    print(f"  permuted (unmasked) vs original on {len(test_x)} test images: max |logit diff| {diff:.2e} "
          f"(max |logit| {float(ref.abs().max()):.1f}); same argmax {100 * same_pred:.2f}%; "
          f"{moved} state tensors reordered")
    met = overall >= MEASURABLE and not worse
    print(f"  target permutation recovers a measurable share of the gap (overall >= {100 * MEASURABLE:.0f}%, "
          f"no layer worse): {100 * overall:.1f}%{f', worse: {worse}' if worse else ''} -> "
          f"{'met' if met else 'NOT met'}")
    return met


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["resnet18", "digits_cnn"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.models:
        run_model(name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
