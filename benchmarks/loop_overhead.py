"""Overhead of compress.finetune vs a hand-written PyTorch loop (same model, data, optimizer, epochs).

usage: python benchmarks/loop_overhead.py [--epochs 5] [--repeats 3]
Prints both wall times (best of --repeats) and their ratio; target: ratio <= 1.10.
"""

import argparse

import torch
from timing import best_of

import compress
from compress.data import build_loader
from compress.recipe import DigitsData
from compress.train import FinetuneConfig, finetune


def plain_loop(model, loader, epochs, lr):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    steps = epochs * len(loader)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    spec = DigitsData(source="digits", split="train", batch_size=64)
    # drop_last so both loops take the same number of steps (finetune drops the last partial batch)
    dataset = build_loader(spec, "train").dataset
    plain_loader = torch.utils.data.DataLoader(dataset, batch_size=64, shuffle=True, drop_last=True)
    ours_loader = build_loader(spec, "train", train=True)
    config = FinetuneConfig(epochs=args.epochs, lr=0.05, keep_best=False)

    def ours():
        torch.manual_seed(0)
        finetune(compress.build("compress.zoo:digits_cnn"), ours_loader, config, progress=False, reshard=True)

    def plain():
        torch.manual_seed(0)
        plain_loop(compress.build("compress.zoo:digits_cnn"), plain_loader, args.epochs, 0.05)

    t_plain = best_of(plain, args.repeats)
    t_ours = best_of(ours, args.repeats)
    print(f"digits_cnn, {args.epochs} epochs, batch 64, threads {torch.get_num_threads()}")
    print(f"plain PyTorch loop : {t_plain:.3f} s")
    print(f"compress.finetune  : {t_ours:.3f} s")
    print(f"ratio finetune/plain = {t_ours / t_plain:.3f}  (target <= 1.10)")


if __name__ == "__main__":
    main()
