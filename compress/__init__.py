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

The public names load on first use (PEP 562 module ``__getattr__``): ``import compress`` and
``compress --help`` do not import torch; the first ``compress.X`` imports the whole API at once.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it (a subpackage is its own module)
_HOMES = {
    "distill": "compress.distill", "export": "compress.export", "prune": "compress.prune", "ptq": "compress.ptq",
    "qat": "compress.qat", "quant": "compress.quant", "sparsity": "compress.sparsity",
    "CheckpointError": "compress.errors", "CompressError": "compress.errors", "DataError": "compress.errors",
    "RecipeError": "compress.errors",
    "CheckResult": "compress.export.check", "check": "compress.export.check",
    "build": "compress.models", "load": "compress.models", "load_model": "compress.models", "save": "compress.models",
    "restore": "compress.models",
    "Recipe": "compress.recipe", "load_recipe": "compress.recipe",
    "Callback": "compress.train", "FinetuneConfig": "compress.train", "finetune": "compress.train",
}

if TYPE_CHECKING:  # what type checkers and IDEs see: the names as they were imported eagerly
    from compress import distill, export, prune, ptq, qat, quant, sparsity
    from compress.errors import CheckpointError, CompressError, DataError, RecipeError
    from compress.export.check import CheckResult, check
    from compress.models import build, load, load_model, restore, save
    from compress.recipe import Recipe, load_recipe
    from compress.train import Callback, FinetuneConfig, finetune


def load_all() -> None:
    """Import the whole public API (every stage package, so each registers its checkpoint rebuild and its
    stage type). The first ``compress.X`` does this; the CLI calls it before it runs a command."""
    for name, home in _HOMES.items():
        globals()[name] = getattr(importlib.import_module(home), name) if home != f"compress.{name}" \
            else importlib.import_module(home)


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        load_all()
        return globals()[name]
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")  # compress.io, compress.zoo, ...: reachable as before
    raise AttributeError(f"module 'compress' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})


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
