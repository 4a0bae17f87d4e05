"""Fine-tune a small model on digits; run as one process or under torchrun. Rank 0 saves the result.

usage: python ddp_finetune.py OUT.pt FACTORY   (or: torchrun --nproc_per_node=2 ddp_finetune.py ...)
"""

import sys

import torch

import compress
from compress.data import build_loader
from compress.metrics import collect, top1
from compress.recipe import DigitsData
from compress.train import FinetuneConfig, finetune, is_main_process, world

out, factory = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
model = compress.build(factory)
train = build_loader(DigitsData(source="digits", split="train", batch_size=64), "train", train=True)
test = build_loader(DigitsData(source="digits", split="test", batch_size=256), "eval")
config = FinetuneConfig(epochs=3, lr=0.05, momentum=0.9, weight_decay=0.0, seed=0, keep_best=False)
finetune(model, train, config, progress=False)
outputs = collect(model, test)
if is_main_process():
    torch.save(
        {"state_dict": model.state_dict(), "top1": top1(outputs.logits, outputs.labels), "world": world()[1]}, out
    )
