"""ViT channel pruning to 2x true MACs: ours (head-aware) vs Torch-Pruning's MetaPruner, the same fine-tune.

usage: python benchmarks/vit_prune_compare.py --checkpoint BASE.pt [--epochs 5] [--lr 5e-4] [--reduction 2.0]
                                              [--distill] [--latency] [--threads 1]

Model: a trained ``compress.zoo:vit_tiny`` compress checkpoint (torchvision VisionTransformer, width 64,
4 heads of 16, MLP 128, 2 blocks, patch 8 on 32x32). Data: digits at size 32, 3 channels; fine-tune on
the shuffled train split (1437 images, batch 64), top1 on the test split (360 images). MACs:
``compress.profile.count_macs`` (Conv/Linear *and* the attention matmuls Q.Kt, A.V: "true" MACs).

Every pruned model gets the same fine-tune: ``compress.finetune`` AdamW, cosine, ``--lr``, ``--epochs``,
seed 0, the last epoch kept (no selection on the test split); with ``--distill`` every fine-tune (both sides)
distils from the unpruned model (``compress.distill.Distiller``, T 4, alpha 0.7). ``--latency``: ONNX Runtime
(CPU, level all, opset 13, ``--threads`` threads) latency ratio unpruned/pruned at batch 1 and 8, timed
interleaved (``compress.prune.latency.engine_latency``).
  (a) unpruned.
  (b) ours, whole heads: ``prune.channels(macs_reduction, prune_num_heads=True)`` (round_to 8 default).
  (c) ours, head dims: ``prune.channels(macs_reduction, round_to=4)`` (every head keeps the same dims).
  (d) Torch-Pruning 1.6 ``MetaPruner`` (GroupMagnitudeImportance p=1, local, round_to = num_heads as its
      torchvision example does, the head ignored, ``hidden_dim`` set after), one step at the smallest
      ``pruning_ratio`` reaching ``--reduction`` (bisected on copies).
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings

import torch
import torch_pruning as tp
from torch import nn

import compress
from compress.data import build_loader
from compress.data_config import DigitsData
from compress.models import count_params
from compress.profile import count_macs
from compress.prune import latency


def _loader(split: str, train: bool) -> torch.utils.data.DataLoader:
    spec = DigitsData(source="digits", split=split, size=32, channels=3, batch_size=64 if train else 256)
    return build_loader(spec, f"digits:{split}", train=train)


def _top1(model: nn.Module, test: torch.utils.data.DataLoader) -> float:
    return compress.metrics.score("top1", compress.metrics.collect(model, test))["top1"]


def _tp_prune(model: nn.Module, example: torch.Tensor, ratio: float) -> nn.Module:
    model = copy.deepcopy(model)
    heads = model.encoder.layers[0].num_heads
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.GroupMagnitudeImportance(p=1),
                                      pruning_ratio=ratio, round_to=heads, ignored_layers=[model.heads.head])
        pruner.step()
    model.hidden_dim = model.conv_proj.out_channels  # torchvision's forward reshapes with it
    return model


def _tp_to_macs(model: nn.Module, example: torch.Tensor, target: float) -> tuple[nn.Module, float]:
    low, high = 0.0, 0.95
    while high - low > 1 / 256:
        mid = (low + high) / 2
        low, high = (mid, high) if count_macs(_tp_prune(model, example, mid), example) > target else (low, mid)
    return _tp_prune(model, example, high), high


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--reduction", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--distill", action="store_true")
    parser.add_argument("--latency", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    train, test = _loader("train", True), _loader("test", False)
    base = compress.load(args.checkpoint).eval()
    example = torch.zeros(1, 3, 32, 32)
    macs0 = count_macs(base, example)
    config = compress.FinetuneConfig(epochs=args.epochs, lr=args.lr, optimizer="adamw", schedule="cosine", seed=0,
                                     keep_best=False)

    def flow(name: str, build) -> None:  # noqa: ANN001
        start = time.perf_counter()
        model = build()
        macs, pruned = count_macs(model, example), _top1(model, test)
        attn = next(m for m in model.modules() if isinstance(m, nn.MultiheadAttention))
        layout = f"{attn.num_heads}x{attn.head_dim} mlp {[b.mlp[0].out_features for b in model.encoder.layers]}"
        if name != "unpruned":
            callbacks = []
            if args.distill:
                callbacks = [compress.distill.Distiller(model, copy.deepcopy(base), temperature=4.0, alpha=0.7,
                                                        example_input=example).callback()]
            compress.finetune(model, train, config, callbacks=callbacks, progress=False, reshard=True)
        speed = ""
        if args.latency:
            import tempfile
            from pathlib import Path

            with tempfile.TemporaryDirectory() as tmp:
                figures = latency.engine_latency(base, model.eval(), example, [1, 8], Path(tmp), threads=args.threads,
                                                 seconds=4.0)
            speed = " | " + ", ".join(f"b{f.batch_size} {f.before / f.after:.2f}x" for f in figures)
        print(f"| {name} | {macs0 / macs:.2f}x | {count_params(model):,} | {layout} | {pruned:.4f} | "
              f"{_top1(model, test):.4f}{speed} | {time.perf_counter() - start:.0f} s |", flush=True)

    kind = "distilled" if args.distill else "fine-tuned"
    print(f"| flow | MACs reduction | params | heads x dim, MLP | top1 pruned | top1 {kind} {args.epochs} ep |"
          + (" ORT latency unpruned/pruned |" if args.latency else "") + " time |")
    print("|---|---|---|---|---|---|" + ("---|" if args.latency else "") + "---|")
    flow("unpruned", lambda: copy.deepcopy(base))

    def ours(**kw) -> nn.Module:  # noqa: ANN003
        model = copy.deepcopy(base)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compress.prune.channels(model, example, macs_reduction=args.reduction, **kw)
        return model

    flow("ours: whole heads (round_to 8)", lambda: ours(prune_num_heads=True))
    flow("ours: head dims (round_to 4)", lambda: ours(round_to=4))
    flow("Torch-Pruning MetaPruner", lambda: _tp_to_macs(base, example, macs0 / args.reduction)[0])


if __name__ == "__main__":
    main()
