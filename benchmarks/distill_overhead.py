"""Teacher overhead: a KD training step's time over a plain step's, with the teacher live and cached.

usage: python benchmarks/distill_overhead.py [--models digits_cnn resnet18] [--repeats 7] [--threads 2]

Teacher: the cached bench_models model (digits_cnn, resnet18_teacher); student: the same model channel-pruned to 2x fewer MACs (the
recovery case). Each timed run is one ``compress.finetune`` epoch over the shuffled digits train split
(22 steps of batch 64, same seed so the same order each run), no evaluation. Flows take turns run by
run (``timing.interleaved_ms``) so background load hits all alike; the median of ``--repeats`` runs
after 2 warm-up runs is reported per step:
  plain:     cross-entropy only.
  KD live:   ``Distiller(temperature=4, alpha=0.7)`` callback; the teacher runs forward every step.
  KD cached: the same with ``cache=True``; its warm-up runs filled the cache, so the timed runs read
             teacher outputs instead of running the teacher.
Printed ratios: KD live / plain and KD cached / plain (no target in the issue; reported).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import bench_models  # noqa: E402
from timing import interleaved_ms  # noqa: E402

import compress  # noqa: E402
from compress.data import build_loader  # noqa: E402
from compress.distill import Distiller  # noqa: E402
from compress.prune import ChannelOptions, ChannelPruner  # noqa: E402
from compress.recipe import DigitsData  # noqa: E402

MODELS = {"digits_cnn": bench_models.digits_cnn, "resnet18": bench_models.resnet18_teacher}


def measure(name: str, args: argparse.Namespace) -> None:
    config = compress.FinetuneConfig(epochs=1, lr=0.01, seed=0, keep_best=False)
    teacher, size, channels = MODELS[name]()
    spec = DigitsData(source="digits", split="train", size=size, channels=channels, batch_size=64)
    train = build_loader(spec, "digits:train", train=True)
    example = torch.zeros(1, channels, size, size)
    student = copy.deepcopy(teacher)
    pruner = ChannelPruner(student, example, ChannelOptions(), where="bench")
    pruner.prune_to_macs(2.0)
    pruner.finish()
    models = {flow: copy.deepcopy(student) for flow in ("plain", "KD live", "KD cached")}
    live = Distiller(models["KD live"], teacher, temperature=4.0, alpha=0.7)
    cached = Distiller(models["KD cached"], teacher, temperature=4.0, alpha=0.7, cache=True)
    callbacks = {"plain": [], "KD live": [live.callback()], "KD cached": [cached.callback()]}
    steps = len(train.dataset) // 64  # type: ignore[arg-type]
    runners = {flow: (lambda f=flow: compress.finetune(models[f], train, config, callbacks=callbacks[f],
                                                       progress=False, reshard=True))
               for flow in models}
    times = interleaved_ms(runners, args.repeats, warmup=2)
    per_step = {flow: statistics.median(t) / steps for flow, t in times.items()}
    assert cached.cache is not None and cached.cache.computed <= len(train.dataset), "timed runs missed the cache"  # type: ignore[arg-type]
    print(f"\n{name} ({size}x{size}, student at 2x fewer MACs, {steps} steps/epoch, {args.threads} threads)")
    for flow, ms in per_step.items():
        spread = f"{min(times[flow]) / steps:.2f}-{max(times[flow]) / steps:.2f}"
        print(f"  {flow:<10} {ms:8.2f} ms/step (range {spread})")
    print(f"  KD live / plain   = {per_step['KD live'] / per_step['plain']:.2f}")
    print(f"  KD cached / plain = {per_step['KD cached'] / per_step['plain']:.2f}")
    live.close()
    cached.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["digits_cnn", "resnet18"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.models:
        measure(name, args)


if __name__ == "__main__":
    main()
