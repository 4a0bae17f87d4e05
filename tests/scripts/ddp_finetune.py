"""Fine-tune a small model on digits; run as one process or under torchrun. Rank 0 saves the result.

usage: python ddp_finetune.py OUT.pt FACTORY [distill|sparse]   (or: torchrun --nproc_per_node=2 ddp_finetune.py ...)

With ``distill``: a digits_mlp teacher (hidden 64, fixed seed) teaches the model through logits KD and
a hint on layer "2" whose learned projection (32 -> 64) must stay identical across processes.
With ``sparse``: the model's first Linear is made 2:4 first; the loop keeps the masks on every process.
"""

import sys

import torch

import compress
from compress.data import build_loader
from compress.metrics import collect, top1
from compress.recipe import DigitsData
from compress.train import FinetuneConfig, finetune, is_main_process, world

out, factory = sys.argv[1], sys.argv[2]
distill, sparse = sys.argv[3:] == ["distill"], sys.argv[3:] == ["sparse"]
torch.manual_seed(0)
model = compress.build(factory, {"hidden": 32} if distill or sparse else {})
if sparse:
    compress.sparsity.apply_2to4(model)
callbacks, extra = [], {}
if distill:
    torch.manual_seed(1)
    teacher = compress.build("compress.zoo:digits_mlp", {"hidden": 64})
    kd = compress.distill.Distiller(model, teacher, hints={"2": "2"}, example_input=torch.zeros(1, 1, 8, 8))
    callbacks = [kd.callback()]
train = build_loader(DigitsData(source="digits", split="train", batch_size=64), "train", train=True)
test = build_loader(DigitsData(source="digits", split="test", batch_size=256), "eval")
config = FinetuneConfig(epochs=3, lr=0.05, momentum=0.9, weight_decay=0.0, seed=0, keep_best=False)
# reshard: seeded global batches split across processes, so 2 processes see exactly the 1-process batches
result = finetune(model, train, config, callbacks=callbacks, progress=False, reshard=True)
if distill:
    extra = {f"projection.{k}": v for k, v in kd.projections.state_dict().items()}
    extra["kd_loss"] = torch.tensor(result.history[-1]["kd_loss"])
outputs = collect(model, test)
if is_main_process():
    torch.save(
        {"state_dict": {**model.state_dict(), **extra}, "top1": top1(outputs.logits, outputs.labels),
         "world": world()[1], "sparse_layers": compress.sparsity.verify_model(model).sparse_layers}, out
    )
