"""A model's outputs by name: one tensor, or a tuple, list, namedtuple or dict of tensors.

Naming rule (the ONNX export uses the same names): one tensor is ``output``; a dict's keys (a Hugging
Face ``ModelOutput`` too); a namedtuple's fields; a plain tuple or list ``output0``, ``output1``, ...

The task metric (top1, a user metric, training's cross-entropy, logits KD) applies to one of them:
the one the recipe names (``metric: {name: top1, output: logits}``), else the only one, else
``logits`` or ``out`` when present (Hugging Face, torchvision segmentation); else it must be named.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from compress.errors import CompressError

SINGLE = "output"  # the name of a model's one tensor output (also its ONNX output name)
PREFERRED = ("logits", "out")  # task outputs found without being named, in this order


def named(out: Any) -> dict[str, torch.Tensor]:
    """``out`` (what a forward returned) as ``{name: tensor}`` in the model's order (see the module doc).

    Raises:
        CompressError: ``out`` is not a tensor or a flat tuple/list/dict of tensors (nested, None, ...).
    """
    if isinstance(out, torch.Tensor):
        return {SINGLE: out}
    if isinstance(out, Mapping):
        items = [(str(k), v) for k, v in out.items()]
    elif isinstance(out, tuple) and hasattr(out, "_fields"):
        items = list(zip(out._fields, out, strict=True))
    elif isinstance(out, (tuple, list)):
        items = [(f"{SINGLE}{i}", v) for i, v in enumerate(out)]
    else:
        raise CompressError(f"the model returns a {type(out).__name__}; compress needs a tensor, or a tuple, list or "
                            "dict of tensors")
    if not items:
        raise CompressError(f"the model returns an empty {type(out).__name__}; it needs at least one tensor output")
    for name, value in items:
        if not isinstance(value, torch.Tensor):
            raise CompressError(f"the model's output '{name}' is a {type(value).__name__}, not a tensor; compress "
                                "compares a tensor, or a flat tuple, list or dict of tensors")
        if value.dim() == 0:
            raise CompressError(f"the model's output '{name}' is a scalar (a 0-d tensor, such as a loss); compress "
                                "compares per-sample outputs with a batch dimension: return it only in training")
    return dict(items)


def describe(names: Sequence[str]) -> str:
    """``'a', 'b'`` for messages."""
    return ", ".join(f"'{n}'" for n in names)


def task_output(names: Sequence[str], output: str | None = None) -> str | None:
    """The name of the output the task metric applies to, or None when it must be named (see module doc).

    Raises:
        CompressError: ``output`` is not among ``names`` (the message lists them).
    """
    if output is not None:
        if output not in names:
            raise CompressError(f"'{output}' is not an output of the model (it returns {describe(names)})")
        return output
    if len(names) == 1:
        return names[0]
    return next((n for n in PREFERRED if n in names), None)


def require_task(names: Sequence[str], output: str | None = None) -> str:
    """:func:`task_output`, which every caller that needs the task output uses: the one rule.

    Raises:
        CompressError: ``output`` is not among ``names``, or none is named and the rule picks none.
    """
    name = task_output(names, output)
    if name is None:
        raise CompressError(unnamed(names))
    return name


def unnamed(names: Sequence[str]) -> str:
    """The message for several outputs none of which the rule picks."""
    return (f"the model returns {len(names)} outputs ({describe(names)}) and none is named {' or '.join(PREFERRED)}; "
            f"name the one the metric applies to: metric: {{name: top1, output: {names[0]}}}")


def select(out: Any, output: str | None = None) -> torch.Tensor:
    """The task output's tensor from what a forward returned.

    Raises:
        CompressError: the output cannot be found (see :func:`named`, :func:`task_output`).
    """
    if output is None and isinstance(out, torch.Tensor):
        return out
    tensors = named(out)
    return tensors[require_task(list(tensors), output)]
