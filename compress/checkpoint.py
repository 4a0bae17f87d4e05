"""The compress checkpoint file: its schema, the content hash of its weights, and the finite-weights rule.

A checkpoint is a file from anywhere, so nothing in it is used before :func:`parse` has checked
every field's type (and :mod:`compress.structure` every structural payload's)::

    {"format": "compress.checkpoint", "version": 1, "factory": "pkg.mod:fn", "kwargs": {...},
     "structure": [{"kind": ..., "payload": {...}}, ...], "state_dict": {name: tensor},
     "metadata": {...}, "weights_sha256": "<64 hex digits>"}

``weights_sha256`` (:func:`weights_digest`) covers every tensor's name, dtype, shape and bytes, so
weights edited after saving (flipped bytes behind a stale zip CRC) are refused; files written before
it existed have none and still load.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from compress import structure
from compress.errors import CheckpointError
from compress.structure import Change

FORMAT = "compress.checkpoint"
VERSION = 1
KEYS = ("format", "version", "factory", "kwargs", "structure", "state_dict", "metadata", "weights_sha256")
_REQUIRED = ("format", "version", "factory", "kwargs", "structure", "state_dict")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MAX_DEPTH = 32  # kwargs/metadata nest a few levels; a deeper file is hostile (RecursionError bait)


@dataclass(frozen=True)
class Checkpoint:
    """A compress checkpoint whose fields have the right types (see :func:`parse`)."""

    factory: str
    kwargs: dict[str, Any]
    structure: list[dict[str, Any]]
    changes: list[Change]
    state_dict: dict[str, torch.Tensor]
    metadata: dict[str, Any]
    weights_sha256: str | None


def is_compress_checkpoint(obj: Mapping[Any, Any]) -> bool:
    """Whether a loaded dict claims to be a compress checkpoint: its ``format`` says so, or it has a ``format``
    next to compress's ``factory``/``structure`` (a damaged one). Other wrappers load as raw state_dicts."""
    return obj.get("format") == FORMAT or ("format" in obj and ("factory" in obj or "structure" in obj))


def _json_problem(value: Any, path: str, depth: int = 0) -> str | None:
    """Where ``value`` stops being plain JSON-like data (None, bool, int, float, str, lists, str-keyed dicts)."""
    if depth > _MAX_DEPTH:
        return f"'{path}' nests more than {_MAX_DEPTH} levels deep"
    if value is None or isinstance(value, (bool, int, float, str)):
        return None
    if isinstance(value, (list, tuple)):
        return next((p for i, v in enumerate(value) if (p := _json_problem(v, f"{path}[{i}]", depth + 1))), None)
    if isinstance(value, dict):
        for key, v in value.items():
            if not isinstance(key, str):
                return f"'{path}' has key {key!r} of type {type(key).__name__}, expected a string"
            if problem := _json_problem(v, f"{path}.{key}", depth + 1):
                return problem
        return None
    return f"'{path}' is of type {type(value).__name__}, expected plain data (numbers, strings, lists, dicts)"


def check_state_dict(state_dict: object, source: str, field: str = "state_dict") -> dict[str, torch.Tensor]:
    """A dict of string names to dense tensors.

    Raises:
        CheckpointError: one line naming ``source`` and the first bad key or entry.
    """
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"checkpoint {source}: field '{field}' is of type {type(state_dict).__name__}, expected a "
                              "dict of tensors")
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise CheckpointError(f"checkpoint {source}: field '{field}' has key {key!r} of type "
                                  f"{type(key).__name__}; tensor names are strings")
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"checkpoint {source}: field '{field}.{key}' is of type {type(value).__name__}, "
                                  "expected a tensor")
        if value.layout != torch.strided or value.is_quantized or value.is_nested:
            raise CheckpointError(f"checkpoint {source}: field '{field}.{key}' is a {value.layout} "
                                  f"{value.dtype} tensor; compress checkpoints hold dense tensors")
        if value.is_meta:  # shapes without data: nothing to load, hash or check
            raise CheckpointError(f"checkpoint {source}: field '{field}.{key}' is a meta tensor (a shape without "
                                  "values); compress checkpoints hold the weights themselves")
    return state_dict


def parse(obj: dict[Any, Any], source: str) -> Checkpoint:
    """Check every field of a loaded compress checkpoint before any of it is used.

    Raises:
        CheckpointError: one line naming ``source`` and the bad field: unknown or missing keys, a
            field of the wrong type, a newer format version, an unknown structural change, a payload
            that does not match its schema, a non-tensor state_dict entry.
    """
    where = f"checkpoint {source}"
    if obj.get("format") != FORMAT:
        raise CheckpointError(f"{where}: field 'format' is {obj.get('format')!r}, expected '{FORMAT}'")
    unknown = sorted(str(k) for k in obj if k not in KEYS)
    if unknown:
        raise CheckpointError(f"{where}: unknown field '{unknown[0]}' (a compress checkpoint has {', '.join(KEYS)})")
    missing = [k for k in _REQUIRED if k not in obj]
    if missing:
        raise CheckpointError(f"{where}: is a damaged compress checkpoint: field '{missing[0]}' is missing")
    version = obj["version"]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"{where}: field 'version' is {version!r}, expected a positive integer")
    if version > VERSION:
        raise CheckpointError(f"{where}: format version {version} is newer than this compress reads ({VERSION})")
    if not isinstance(obj["factory"], str):
        raise CheckpointError(f"{where}: field 'factory' is of type {type(obj['factory']).__name__}, expected a "
                              "'module:callable' string")
    for field in ("kwargs", "metadata"):
        value = obj.get(field, {})
        if not isinstance(value, dict):
            raise CheckpointError(f"{where}: field '{field}' is of type {type(value).__name__}, expected a dict")
        if problem := _json_problem(value, field):
            raise CheckpointError(f"{where}: field {problem}")
    digest = obj.get("weights_sha256")
    if digest is not None and not (isinstance(digest, str) and _SHA256.fullmatch(digest)):
        raise CheckpointError(f"{where}: field 'weights_sha256' is not a sha256 hex digest")
    changes = structure.parse(obj["structure"], source)
    state_dict = check_state_dict(obj["state_dict"], source)
    return Checkpoint(obj["factory"], obj["kwargs"], obj["structure"], changes, state_dict, obj.get("metadata", {}),
                      digest)


def weights_digest(state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and raw bytes, in sorted name order.

    Independent of device, memory layout and pickling: two state_dicts with equal names, dtypes,
    shapes and bit-identical values have the same digest.
    """
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        header = f"{name}\0{str(tensor.dtype).removeprefix('torch.')}\0{list(tensor.shape)}\0{tensor.numel()}\0"
        digest.update(header.encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def verify_digest(checkpoint: Checkpoint, source: str) -> None:
    """Refuse weights whose digest differs from the one saved with them (no digest: nothing to verify).

    Raises:
        CheckpointError: the weights changed since the file was saved.
    """
    if checkpoint.weights_sha256 is None:
        return
    actual = weights_digest(checkpoint.state_dict)
    if actual != checkpoint.weights_sha256:
        raise CheckpointError(f"checkpoint {source}: weights changed since saved (their sha256 is {actual[:12]}..., "
                              f"the file records {checkpoint.weights_sha256[:12]}...); the file was edited or damaged")


@torch.no_grad()
def check_finite(state_dict: Mapping[str, torch.Tensor], source: str, unset: Collection[str] = ()) -> None:
    """Refuse NaN or Inf in any floating tensor, naming it.

    Args:
        unset: names whose all-NaN value means "not set yet" (a quantizer's amax before calibration:
            the freshly built model holds NaN there itself); any other non-finite value is refused.

    Raises:
        CheckpointError: a tensor holds NaN or Inf.
    """
    for name, tensor in state_dict.items():
        if not (tensor.is_floating_point() or tensor.is_complex()):
            continue
        values = tensor if tensor.itemsize > 1 else tensor.float()  # float8 has no isfinite; float32 holds it exactly
        finite = torch.isfinite(values)
        if bool(finite.all()) or (name in unset and bool(torch.isnan(values).all())):
            continue
        bad = int((~finite).sum())
        raise CheckpointError(f"checkpoint {source}: tensor '{name}' holds NaN or Inf ({bad} of {tensor.numel()} "
                              "values); compress refuses non-finite weights")
