"""Model spec -> ``nn.Module``, and pickle-free compress checkpoints.

A compress checkpoint is a plain dict saved with ``torch.save`` and read back with
``torch.load(weights_only=True)``::

    {"format": "compress.checkpoint", "version": 1, "factory": "pkg.mod:fn", "kwargs": {...},
     "structure": [{"kind": ..., "payload": {...}}, ...], "state_dict": {...}, "metadata": {...},
     "weights_sha256": "..."}

Loading checks every field's type (:mod:`compress.checkpoint`) and the weights' sha256, builds
``factory(**kwargs)``, replays ``structure`` (pruning plans, quantizers, masks) and loads
``state_dict`` strictly. Whole pickled modules are refused. Identical content saves to identical bytes.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import stat
import struct
import zipfile
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn

# the structure kinds a checkpoint may carry register their rebuild on import: the loader loads them
import compress.prune.plan  # noqa: F401
import compress.quant.insert  # noqa: F401
import compress.sparsity.masks  # noqa: F401
from compress import io, structure
from compress.checkpoint import (
    FORMAT,
    VERSION,
    Checkpoint,
    check_finite,
    check_state_dict,
    is_compress_checkpoint,
    parse,
    verify_digest,
    weights_digest,
)
from compress.errors import CheckpointError, CompressError, first_line
from compress.imports import resolve
from compress.profile import count_nonzero_params, count_params  # noqa: F401  (re-exported: their old home)
from compress.trust import check_factory, safe_kwargs

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


def _open_regular(path: Path) -> IO[bytes]:
    """Open ``path`` for reading only if it is a regular file: never a device, FIFO or socket, which
    could block or never end (``/dev/zero``)."""
    try:  # O_NONBLOCK: opening a FIFO must not wait for a writer
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path}: file not found") from None
    except IsADirectoryError:
        raise CheckpointError(f"checkpoint {path}: is a directory, expected a checkpoint file") from None
    except OSError as exc:  # ENAMETOOLONG, EACCES, ELOOP, ...
        raise CheckpointError(f"checkpoint {path}: cannot open it: {exc.strerror or first_line(exc)}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file (a device, FIFO or socket)"
        raise CheckpointError(f"checkpoint {path}: is {kind}, expected a checkpoint file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` with errors that say what is wrong and how to fix it.

    Raises:
        CheckpointError: missing or non-regular file, pickled objects, corrupt/truncated file, or not a dict.
    """
    path = Path(path)
    with _open_regular(path) as fh:
        try:
            obj = torch.load(fh, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            if "Unsupported global" not in str(exc):  # garbage bytes also fail in the weights-only unpickler
                raise CheckpointError(
                    f"checkpoint {path}: not a readable torch checkpoint (truncated or corrupt?): {first_line(exc)}"
                ) from None
            raise CheckpointError(
                f"checkpoint {path}: holds pickled Python objects (e.g. a whole nn.Module), which compress never "
                "unpickles; save weights instead: torch.save(model.state_dict(), path) or compress.save(model, path)"
            ) from None
        except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, KeyError, IndexError, ValueError, struct.error,
                RecursionError, MemoryError, OverflowError) as exc:
            # A truncated or non-torch file fails in the legacy unpickler in many ways (EOFError with no
            # message, KeyError on a memo index, ...): all of them mean "not a checkpoint".
            raise CheckpointError(
                f"checkpoint {path}: not a readable torch checkpoint (truncated or corrupt?): {first_line(exc)}"
            ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path}: holds a {type(obj).__name__}, expected a state_dict (a dict)")
    return obj


def _raw_state_dict(obj: dict[str, Any], path: Path) -> dict[str, torch.Tensor]:
    for key in _WRAPPER_KEYS:
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"checkpoint {path}: contains no tensors; expected a state_dict")
    check_state_dict(tensors, str(path))  # string names, dense tensors
    if all(k.startswith("module.") for k in tensors):  # saved from a DDP/DataParallel wrapper
        tensors = {k.removeprefix("module."): v for k, v in tensors.items()}
    return tensors


def _unset_buffers(model: nn.Module) -> set[str]:
    """Buffers the freshly built model holds as all-NaN ("not set yet", e.g. an uncalibrated quantizer's amax)."""
    return {name for name, b in model.named_buffers() if b.is_floating_point() and b.numel()
            and bool(torch.isnan(b).all())}


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
    complex_ = [f"{k} checkpoint {state_dict[k].dtype} vs model {v.dtype}" for k, v in own.items()
                if k in state_dict and state_dict[k].is_complex() and not v.is_complex()]  # copy_ drops the imaginary part
    problems = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", shapes),
                         ("complex into real", complex_)):
        if items:
            shown = ", ".join(items[:5]) + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise CheckpointError(f"checkpoint {source} does not match the model: " + "; ".join(problems))
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:  # e.g. a complex tensor into a float parameter
        raise CheckpointError(f"checkpoint {source} does not load into the model: {first_line(exc)}") from None


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

    Before anything in a compress checkpoint is used, every field is type-checked
    (:func:`compress.checkpoint.parse`) and its weights are compared with the sha256 saved with them;
    NaN/Inf weights are refused in any checkpoint.

    Raises:
        CheckpointError: a malformed or edited file, non-finite weights, an untrusted factory,
            ``trust`` given as one string (one line naming the file and field).
        CompressError: see :func:`read_checkpoint`, :func:`build`.
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
        return _load_compress(parse(obj, str(path)), path, factory, kwargs, trust=trust, allow=allow)
    if factory is None:
        raise CheckpointError(
            f"checkpoint {path}: is a raw state_dict; the recipe's model.factory must say how to build the model"
        )
    state_dict = _raw_state_dict(obj, path)
    model = build(factory, kwargs)
    check_finite(state_dict, str(path), unset=_unset_buffers(model))
    load_state_dict(model, state_dict, str(path))
    return model


# A file's kwargs decide how big the factory's model is before any of its weights are read. Pruning
# only shrinks a model, so the built model may be larger than the file's weights, but not by this much:
# channel pruning to a quarter of the channels keeps 1/16 of a conv's weights.
_MAX_GROWTH, _SLACK_BYTES = 64, 1 << 30


def _refuse_oversized(ckpt: Checkpoint, kwargs: dict[str, Any], path: Path) -> None:
    """Build the model on the meta device (no memory) and refuse one far larger than the file's weights.

    Raises:
        CheckpointError: the file's kwargs would build a model of more than 64x its weights + 1 GiB.
    """
    try:
        with torch.device("meta"):
            probe = build(ckpt.factory, kwargs)
    except Exception:  # noqa: BLE001  a factory that cannot build on meta: the real build decides
        return
    need = sum(t.numel() * t.element_size() for t in (*probe.parameters(), *probe.buffers()))
    held = sum(t.numel() * t.element_size() for t in ckpt.state_dict.values())
    if need > _MAX_GROWTH * held + _SLACK_BYTES:
        raise CheckpointError(
            f"checkpoint {path}: kwargs {kwargs} would build a model of {_human(need)}, but the file "
            f"holds {_human(held)} of weights; refusing to allocate it (kwargs edited?)"
        )


def _human(size: int) -> str:
    shift, unit = next(((s, u) for s, u in ((30, "GiB"), (20, "MiB")) if size >= 1 << s), (10, "KiB"))
    return f"{size / (1 << shift):.1f} {unit}"


def _load_compress(ckpt: Checkpoint, path: Path, factory: str | None, kwargs: dict[str, Any] | None, *,
                   trust: Sequence[str], allow: Collection[str]) -> nn.Module:
    """Rebuild a parsed compress checkpoint's model: weights verified, factory trusted, structure replayed."""
    verify_digest(ckpt, str(path))
    if not ckpt.factory:
        raise CheckpointError(f"checkpoint {path}: records no factory (it was saved from a model compress did not "
                              "build); build the model as you did then and call compress.restore(model, path)")
    check_factory(ckpt.factory, str(path), trust=trust, named={*allow, *([factory] if factory else [])})
    own_kwargs = safe_kwargs(ckpt.kwargs)  # the file's weights replace pretrained ones: never fetch those
    if factory is not None and factory != ckpt.factory:
        raise CheckpointError(f"checkpoint {path}: was saved from factory '{ckpt.factory}', but the recipe says '{factory}'")
    if kwargs and safe_kwargs(dict(kwargs)) != own_kwargs:
        raise CheckpointError(f"checkpoint {path}: was saved with kwargs {own_kwargs}, but the recipe says {dict(kwargs)}")
    try:
        _refuse_oversized(ckpt, own_kwargs, path)
        model = build(ckpt.factory, own_kwargs)
    except CheckpointError:
        raise
    except CompressError as exc:
        raise CheckpointError(f"checkpoint {path}: cannot rebuild its model: {exc}") from None
    return _apply_checkpoint(model, ckpt, str(path))


def _apply_checkpoint(model: nn.Module, ckpt: Checkpoint, source: str) -> nn.Module:
    """Replay ``ckpt``'s structure onto ``model`` (as its factory builds it), load its weights, check them, and let
    the model keep its structure from now on."""
    model = structure.replay(model, ckpt.changes, source)
    check_finite(ckpt.state_dict, source, unset=_unset_buffers(model))
    load_state_dict(model, ckpt.state_dict, source)
    origin = structure.origin_of(model)
    if origin is not None:
        origin.structure = copy.deepcopy(ckpt.structure)
    structure.verify(model, source)  # each kind's own check of the loaded weights (2:4 masks hold)
    structure.enforce(model)  # then the model keeps its structure itself (2:4 masks in any training loop)
    return model


def restore(model: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Apply a compress checkpoint's recorded structure and weights to ``model``, a model you built yourself.

    The counterpart of ModelOpt's ``mto.restore``: build the model exactly as before the checkpoint's
    compression (same architecture, float, unpruned), and the checkpoint's pruning plan, quantizers and
    2:4 masks are replayed onto it, then its weights loaded strictly and checked as :func:`load` checks them.
    Nothing the file names is imported or called (its factory is only remembered, for a later :func:`save`).

    Args:
        model: the freshly built float model (not wrapped in DDP; not already pruned, sparse or quantized).
        path: a file written by :func:`save`.

    Returns:
        The restored model: use the returned object (quantization may return a new ``fx.GraphModule``);
        ``model`` itself may have been changed in place (pruned layers): on an error, build it again.

    Raises:
        CheckpointError: not a compress checkpoint, an edited file, a structure or state_dict that does not
            fit ``model``, weights that break the recorded 2:4 masks (one line naming the file).
        CompressError: ``model`` already carries compress structure, or is wrapped in DDP.
    """
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        raise CompressError("compress.restore: pass the model itself, then wrap the restored model in DDP")
    origin = structure.origin_of(model)
    if origin is not None and origin.structure:
        raise CompressError("compress.restore: the model already carries compressed structure; restore onto a "
                            "freshly built model")
    path = Path(path)
    obj = read_checkpoint(path)
    if not is_compress_checkpoint(obj):
        raise CheckpointError(f"checkpoint {path}: is a raw state_dict, not a compress checkpoint; use "
                              "model.load_state_dict(torch.load(path, weights_only=True))")
    ckpt = parse(obj, str(path))
    verify_digest(ckpt, str(path))
    structure.set_origin(model, structure.Origin(ckpt.factory, dict(ckpt.kwargs)))
    return _apply_checkpoint(model, ckpt, str(path))


def save(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    factory: str | None = None,
    kwargs: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
) -> None:
    """Write a compress checkpoint atomically (never a half-written file at ``path``).

    The model is checked as :func:`load` checks it, with the same message, so a file that ``load`` would
    refuse is never written (e.g. weights that break the model's 2:4 masks).

    Args:
        model: any model (a DDP wrapper is unwrapped).
        factory/kwargs: how :func:`load` rebuilds it; default: what :func:`build` (or ``load``) recorded, else
            none: a model's class alone does not say how it was built (``resnet18(num_classes=4)``), so the
            file is then applied with :func:`restore` onto a model you build.
        metadata: JSON-serialisable extras (metrics, recipe name).

    Raises:
        CheckpointError: the model fails a check :func:`load` makes (one line naming ``path``).
    """
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    origin = structure.origin_of(model)
    structure.verify(model, str(path))
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "factory": factory or (origin.factory if origin else ""),
        "kwargs": safe_kwargs(dict(kwargs if kwargs is not None else origin.kwargs if origin else {})),
        "structure": copy.deepcopy(origin.structure) if origin else [],
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "metadata": json.loads(json.dumps(metadata or {})),
    }
    check_finite(payload["state_dict"], str(path), unset=_unset_buffers(model))
    payload["weights_sha256"] = weights_digest(payload["state_dict"])
    io.torch_save(payload, path)


def load(path: str | os.PathLike[str], *, trust: Sequence[str] = ()) -> nn.Module:
    """Load a compress checkpoint written by :func:`save` (pickle-free).

    Args:
        trust: modules whose factories the file may name, beside compress's zoo and torchvision's
            builders (the file's factory is called to rebuild the model: see :mod:`compress.trust`).
    """
    return load_model(path, trust=trust)

