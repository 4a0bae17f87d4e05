"""Distillation in your own training loop: a narrow digits CNN learns from a wider one.

    python examples/distill_digits.py [--epochs 10] [--teacher runs/digits-base/model.pt]

Without ``--teacher`` a teacher is trained first (a few seconds). The student loop is plain PyTorch;
compress only supplies the loss: ``(1 - alpha) * CE + alpha * T^2 * KL + hint_weight * hint``.
"""

from __future__ import annotations

import argparse

import torch

import compress
from compress.data import build_loader
from compress.recipe import DigitsData


def accuracy(model: torch.nn.Module, loader: torch.utils.data.DataLoader) -> float:
    model.eval()
    with torch.no_grad():
        right = sum(int((model(x).argmax(1) == y).sum()) for x, y in loader)
    return right / len(loader.dataset)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--teacher", help="a compress checkpoint of compress.zoo:digits_cnn (default: train one)")
    args = parser.parse_args()
    torch.manual_seed(0)
    train = build_loader(DigitsData(source="digits", split="train", batch_size=64), "train", train=True)
    test = build_loader(DigitsData(source="digits", split="test", batch_size=256), "test")

    if args.teacher:
        teacher = compress.load(args.teacher)
    else:
        teacher = compress.build("compress.zoo:digits_cnn")
        compress.finetune(teacher, train, compress.FinetuneConfig(epochs=8, lr=0.05), progress=False)
    student = compress.build("compress.zoo:digits_cnn", {"width": 12})  # 0.14x the teacher's MACs

    x0, _ = next(iter(train))
    kd = compress.distill.Distiller(student, teacher, temperature=4.0, alpha=0.7,
                                    hints={"layer2": "layer2"}, hint_weight=0.5,  # 24 -> 64 channels:
                                    example_input=x0[:1])                         # a learned 1x1 projection
    optimizer = torch.optim.SGD([*student.parameters(), *kd.parameters()], lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.epochs * len(train))
    for epoch in range(args.epochs):
        student.train()
        for x, y in train:
            loss = kd.loss(x, student(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
        means = kd.epoch_means()
        print(f"epoch {epoch + 1}: kd_loss {means['kd_loss']:.4f} hint_loss {means['hint_loss']:.4f}")
    kd.close()
    print(f"teacher top1 {accuracy(teacher, test):.4f}")
    print(f"student top1 {accuracy(student, test):.4f}")


if __name__ == "__main__":
    main()
