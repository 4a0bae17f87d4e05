"""Saved reference outputs: check an engine against a model that is no longer around.

``compress check ... --save-reference ref.npz`` stores the inputs, the reference's outputs, the labels,
MODEL's own outputs with the drift bound calibrated for it (:mod:`compress.export.drift`) and where they
came from; ``compress check ENGINE --reference ref.npz`` later runs the engine on the same inputs and
compares it with both (drift across library, driver or hardware versions, or a changed engine file). The file is a plain
``.npz`` read with ``allow_pickle=False``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compress import io
from compress.errors import CompressError, first_line

FORMAT = "compress-reference"
VERSION = 2  # 2: MODEL's outputs and their drift bound


@dataclass
class Reference:
    inputs: torch.Tensor
    outputs: torch.Tensor
    labels: torch.Tensor | None
    meta: dict[str, Any] = field(default_factory=dict)
    model_outputs: torch.Tensor | None = None  # MODEL's outputs when saved (files from before v2 lack them)


def is_reference_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names a reference file (``.npz``; :func:`load_reference` says what is wrong with it)."""
    return Path(path).suffix == ".npz"


def save_reference(path: str | os.PathLike[str], inputs: torch.Tensor, outputs: torch.Tensor,
                   labels: torch.Tensor | None, meta: dict[str, Any], model_outputs: torch.Tensor | None = None) -> None:
    """Write a reference file atomically (``meta["drift"]`` holds the bound for ``model_outputs``)."""
    arrays = {"inputs": inputs.detach().cpu().numpy(), "outputs": outputs.detach().cpu().float().numpy(),
              "compress_reference": np.array(json.dumps({"format": FORMAT, "version": VERSION, **meta}))}
    if labels is not None:
        arrays["labels"] = labels.detach().cpu().numpy()
    if model_outputs is not None:
        arrays["model_outputs"] = model_outputs.detach().cpu().float().numpy()
    with io.atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def load_reference(path: str | os.PathLike[str]) -> Reference:
    """Read a reference file.

    Raises:
        CompressError: missing, damaged, not a reference file, or inputs and outputs that do not pair up.
    """
    file = Path(path)
    if (problem := io.file_problem(file)) is not None:
        raise CompressError(f"{file}: reference file: {problem}")
    try:
        with np.load(file, allow_pickle=False) as data:
            if "compress_reference" not in data.files:
                raise CompressError(f"{file}: is not a compress reference file (written by --save-reference)")
            meta = json.loads(str(data["compress_reference"]))
            inputs, outputs = torch.from_numpy(data["inputs"]), torch.from_numpy(data["outputs"])
            labels = torch.from_numpy(data["labels"]) if "labels" in data.files else None
            model_outputs = torch.from_numpy(data["model_outputs"]) if "model_outputs" in data.files else None
    except CompressError:
        raise
    except Exception as exc:  # zipfile/npy/json errors on a damaged file
        raise CompressError(f"{file}: is a damaged reference file ({first_line(exc)})") from None
    if not isinstance(meta, dict):
        raise CompressError(f"{file}: its compress_reference entry is a JSON {type(meta).__name__}, expected an object")
    version = meta.get("version")
    if meta.get("format") != FORMAT or not isinstance(version, int) or isinstance(version, bool) \
            or not 1 <= version <= VERSION:
        raise CompressError(f"{file}: reference format {meta.get('format')!r} v{version!r} is not one this "
                            "compress reads")
    if any(t is not None and t.ndim == 0 for t in (inputs, outputs, labels, model_outputs)):
        raise CompressError(f"{file}: holds a 0-d array; inputs, outputs and labels have one row per sample")
    if len(inputs) != len(outputs) or len(inputs) == 0 or (labels is not None and len(labels) != len(inputs)):
        raise CompressError(f"{file}: holds {len(inputs)} inputs but {len(outputs)} outputs"
                            + ("" if labels is None else f" and {len(labels)} labels"))
    if model_outputs is not None and (model_outputs.shape != outputs.shape or not _bound_ok(meta.get("drift"))):
        raise CompressError(f"{file}: its saved model outputs {list(model_outputs.shape)} or drift bound do not "
                            f"pair with its {list(outputs.shape)} outputs")
    return Reference(inputs, outputs, labels, meta, model_outputs)


def _bound_ok(drift: object) -> bool:
    tol = drift.get("tolerance") if isinstance(drift, dict) else None
    return isinstance(tol, (int, float)) and not isinstance(tol, bool) and 0 <= tol < 1e300  # float() must not overflow
