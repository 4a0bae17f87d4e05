"""compress: prune, distill, sparsify and quantize a trained PyTorch model, export it, check the engine.

The recipe runner (``compress run``) and users' own training scripts use the same verbs::

    import compress
    model = compress.load("runs/digits-base/model.pt")            # pickle-free checkpoints
    compress.finetune(model, train_loader, compress.FinetuneConfig(epochs=3, lr=0.01))
    model = compress.prune.channels(model, example_input, ratio=0.3)  # physically fewer channels
    kd = compress.distill.Distiller(model, teacher, temperature=4.0, alpha=0.7)  # kd.loss(x, model(x), y)
    compress.sparsity.apply_2to4(model, example_input=x, permute=True)  # 2:4, kept by the model in any loop
    qmodel = compress.quant.prepare(model, target="onnxruntime")   # fake quantizers, no global patching
    compress.ptq.calibrate(qmodel, calib_loader, method="percentile")  # then train qmodel in any loop for QAT
    compress.export.onnx(qmodel, example_input, "model.onnx", target="tensorrt")  # Q/DQ ONNX, either target
    result = compress.check("model.onnx", reference=model, data=eval_loader, max_drop=0.5)
    compress.save(model, "model.pt")
    model = compress.restore(build_my_model(), "model.pt")        # structure + weights onto your own model
"""

__version__ = "0.1.0"

from compress import distill, export, prune, ptq, qat, quant, sparsity  # noqa: E402
from compress.errors import CheckpointError, CompressError, DataError, RecipeError  # noqa: E402
from compress.export.check import CheckResult, check  # noqa: E402
from compress.models import build, load, load_model, restore, save  # noqa: E402
from compress.recipe import Recipe, load_recipe  # noqa: E402
from compress.train import Callback, FinetuneConfig, finetune  # noqa: E402

__all__ = [
    "Callback",
    "CheckResult",
    "CheckpointError",
    "CompressError",
    "DataError",
    "FinetuneConfig",
    "Recipe",
    "RecipeError",
    "build",
    "check",
    "distill",
    "export",
    "prune",
    "ptq",
    "qat",
    "quant",
    "sparsity",
    "finetune",
    "load",
    "load_model",
    "load_recipe",
    "restore",
    "save",
]
