"""Model spec -> ``nn.Module``, and pickle-free compress checkpoints.

A compress checkpoint is a plain dict saved with ``torch.save`` and read back with
``torch.load(weights_only=True)``::

    {"format": "compress.checkpoint", "version": 1, "factory": "pkg.mod:fn", "kwargs": {...},
     "structure": [{"kind": ..., "payload": {...}}, ...], "state_dict": {...}, "metadata": {...}}

Loading builds ``factory(**kwargs)``, replays ``structure`` (pruning plans, quantizers, masks) and
loads ``state_dict`` strictly. Whole pickled modules are refused.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import struct
import zipfile
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress import io, structure
from compress.errors import CheckpointError, CompressError, first_line
from compress.imports import resolve
from compress.trust import check_factory, safe_kwargs

FORMAT = "compress.checkpoint"
VERSION = 1
# Common wrappers around a raw state_dict (Lightning, torchvision references, many repos).
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net")


def build(factory: str, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Build ``factory(**kwargs)`` and remember how, so :func:`save` needs no extra arguments.

    Raises:
        CompressError: the factory cannot be imported, fails, or does not return an ``nn.Module``.
    """
    kwargs = dict(kwargs or {})
    fn = resolve(factory, what="model factory")
    try:
        model = fn(**kwargs)
    except CompressError:
        raise
    except Exception as exc:  # any failure of a user's factory on the recipe's kwargs is bad input
        raise CompressError(
            f"model factory '{factory}' failed with kwargs {kwargs}: {type(exc).__name__}: {exc}"
        ) from None
    if not isinstance(model, nn.Module):
        raise CompressError(f"model factory '{factory}' returned {type(model).__name__}, not a torch.nn.Module")
    structure.set_origin(model, structure.Origin(factory, kwargs))
    return model


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` with errors that say what is wrong and how to fix it.

    Raises:
        CheckpointError: missing file, pickled objects, corrupt/truncated file, or not a dict.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path}: is a directory, expected a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Unsupported global" not in str(exc):  # garbage bytes also fail in the weights-only unpickler
            raise CheckpointError(
                f"checkpoint {path}: not a readable torch checkpoint (truncated or corrupt?): {first_line(exc)}"
            ) from None
        raise CheckpointError(
            f"checkpoint {path}: holds pickled Python objects (e.g. a whole nn.Module), which compress never "
            "unpickles; save weights instead: torch.save(model.state_dict(), path) or compress.save(model, path)"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, KeyError, IndexError, ValueError, struct.error) as exc:
        # A truncated or non-torch file fails in the legacy unpickler in many ways (EOFError with no
        # message, KeyError on a memo index, ...): all of them mean "not a checkpoint".
        raise CheckpointError(
            f"checkpoint {path}: not a readable torch checkpoint (truncated or corrupt?): {first_line(exc)}"
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path}: holds a {type(obj).__name__}, expected a state_dict (a dict)")
    return obj


def is_compress_checkpoint(obj: dict[str, Any]) -> bool:
    return obj.get("format") == FORMAT


def _raw_state_dict(obj: dict[str, Any], path: Path) -> dict[str, torch.Tensor]:
    for key in _WRAPPER_KEYS:
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"checkpoint {path}: contains no tensors; expected a state_dict")
    if all(k.startswith("module.") for k in tensors):  # saved from a DDP/DataParallel wrapper
        tensors = {k.removeprefix("module."): v for k, v in tensors.items()}
    return tensors


def load_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Strict load that lists missing/unexpected keys and shape mismatches by name in one line.

    Raises:
        CheckpointError: the state_dict does not match the model.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [
        f"{k} checkpoint {list(state_dict[k].shape)} vs model {list(v.shape)}"
        for k, v in own.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    problems = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", shapes)):
        if items:
            shown = ", ".join(items[:5]) + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise CheckpointError(f"checkpoint {source} does not match the model: " + "; ".join(problems))
    model.load_state_dict(state_dict, strict=True)


def load_model(
    checkpoint: str | os.PathLike[str] | None = None,
    factory: str | None = None,
    kwargs: dict[str, Any] | None = None,
    *,
    trust: Sequence[str] = (),
    allow: Collection[str] = (),
) -> nn.Module:
    """Build a model from a factory and/or load a checkpoint (compress or raw state_dict).

    A compress checkpoint names its own factory; it is called only if it is ``factory`` (or one of
    ``allow``) or its module is trusted (:mod:`compress.trust`: compress's zoo, torchvision's builders,
    and ``trust``), and never with the file's pretrained-weights arguments. A raw state_dict needs
    ``factory``.

    Raises:
        CheckpointError: an untrusted factory, ``trust`` given as one string; and see below.

    Raises:
        CheckpointError / CompressError: see :func:`read_checkpoint`, :func:`build`.
    """
    if isinstance(trust, str) or isinstance(allow, str):
        raise CompressError("load: trust and allow are lists of names, not one string: trust=['mypkg.models']")
    if checkpoint is None:
        if factory is None:
            raise CompressError("model: give a factory or a checkpoint")
        return build(factory, kwargs)
    path = Path(checkpoint)
    obj = read_checkpoint(path)
    if is_compress_checkpoint(obj):
        if obj.get("version", 0) > VERSION:
            raise CheckpointError(f"checkpoint {path}: format version {obj['version']} is newer than this compress")
        own_factory, own_kwargs = obj.get("factory"), obj.get("kwargs", {})
        if not isinstance(own_factory, str) or not isinstance(own_kwargs, dict) or not isinstance(
            obj.get("state_dict"), dict
        ):
            raise CheckpointError(
                f"checkpoint {path}: is a damaged compress checkpoint (needs a factory string, kwargs and state_dict dicts)"
            )
        check_factory(own_factory, str(path), trust=trust, named={*allow, *([factory] if factory else [])})
        own_kwargs = safe_kwargs(own_kwargs)  # the file's weights replace pretrained ones: never fetch those
        if factory is not None and factory != own_factory:
            raise CheckpointError(
                f"checkpoint {path}: was saved from factory '{own_factory}', but the recipe says '{factory}'"
            )
        if kwargs and safe_kwargs(dict(kwargs)) != own_kwargs:
            raise CheckpointError(
                f"checkpoint {path}: was saved with kwargs {own_kwargs}, but the recipe says {dict(kwargs)}"
            )
        try:
            model = build(own_factory, own_kwargs)
        except CheckpointError:
            raise
        except CompressError as exc:
            raise CheckpointError(f"checkpoint {path}: cannot rebuild its model: {exc}") from None
        model = structure.replay(model, list(obj.get("structure", [])), str(path))
        load_state_dict(model, obj["state_dict"], str(path))
        origin = structure.origin_of(model)
        if origin is not None:
            origin.structure = copy.deepcopy(list(obj.get("structure", [])))
        from compress.sparsity.masks import check_weights  # the sparsity package imports this module

        check_weights(model, str(path))
        return model
    if factory is None:
        raise CheckpointError(
            f"checkpoint {path}: is a raw state_dict; the recipe's model.factory must say how to build the model"
        )
    model = build(factory, kwargs)
    load_state_dict(model, _raw_state_dict(obj, path), str(path))
    return model


def save(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    factory: str | None = None,
    kwargs: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
) -> None:
    """Write a compress checkpoint atomically (never a half-written file at ``path``).

    Args:
        model: a model built by compress, or any model when ``factory`` is given.
        factory/kwargs: how to rebuild it; defaults to what :func:`build` recorded.
        metadata: JSON-serialisable extras (metrics, recipe name).

    Raises:
        CompressError: the model's factory is unknown.
    """
    model = getattr(model, "module", model) if isinstance(model, nn.parallel.DistributedDataParallel) else model
    origin = structure.origin_of(model)
    if factory is None and (origin is None or not origin.factory):
        raise CompressError("compress.save: this model was not built by compress; pass factory='module:callable'")
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "factory": factory or origin.factory,  # type: ignore[union-attr]
        "kwargs": safe_kwargs(dict(kwargs if kwargs is not None else origin.kwargs if origin else {})),
        "structure": copy.deepcopy(origin.structure) if origin else [],
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "metadata": json.loads(json.dumps(metadata or {})),
    }
    io.torch_save(payload, path)


def load(path: str | os.PathLike[str], *, trust: Sequence[str] = ()) -> nn.Module:
    """Load a compress checkpoint written by :func:`save` (pickle-free).

    Args:
        trust: modules whose factories the file may name, beside compress's zoo and torchvision's
            builders (the file's factory is called to rebuild the model: see :mod:`compress.trust`).
    """
    return load_model(path, trust=trust)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_nonzero_params(model: nn.Module) -> int:
    return int(sum(int(torch.count_nonzero(p.detach())) for p in model.parameters()))
