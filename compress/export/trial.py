"""The export a dry run tries: a copy of the model exported with the recipe's opset and target to a
temporary file, so an op the exporter cannot write fails ``compress validate``, not the end of a run."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch
from torch import nn

from compress import quant
from compress.errors import CompressError
from compress.export.onnx import export_onnx
from compress.quant.spec import Target


def trial_export(model: nn.Module, judged: str, example_input: torch.Tensor, opset: int, target: Target,
                 dynamic_batch: bool, where: str) -> None:
    """Export a copy of ``model`` (``judged`` says which model it stands for) and throw the file away.

    A model that earlier stages will quantize is tried in float: QuantizeLinear/DequantizeLinear exist
    at every opset a recipe accepts (13 and up), so the float graph's ops are the ones that can fail.

    Raises:
        CompressError: ``where.onnx``: the export fails (the op and the opset it needs, where that is the cause).
    """
    trial = copy.deepcopy(model)
    with tempfile.TemporaryDirectory(prefix="compress-validate-") as folder:
        try:
            export_onnx(trial, example_input, Path(folder) / "model.onnx", opset=opset, dynamic_batch=dynamic_batch,
                        target=target if quant.is_quantized(trial) else None)
        except CompressError as exc:
            raise CompressError(f"{where}.onnx: {judged} does not export: {str(exc).removeprefix('ONNX export failed: ')}"
                                ) from None
