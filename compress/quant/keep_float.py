"""``keep_float``: leave chosen units of a quantized model in float, recorded so checkpoints and exports keep it.

A unit kept float has its quantizers disabled (``quant_enabled = False``): its forward is the float
layer's, and ONNX export writes no QuantizeLinear/DequantizeLinear for it. The disabled quantizers are
recorded as a ``quant_float`` structural change, so a checkpoint rebuilds the model with them disabled
(their calibrated ``amax`` still travels in the state_dict: enabling one again needs no calibration).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch import nn

from compress import structure
from compress.quant.quantizer import TensorQuantizer
from compress.quant.units import Unit, units

KIND = "quant_float"


class FloatRecord(structure.Payload):
    """The ``quant_float`` payload: the units kept float and their quantizers' module names."""

    units: list[str]
    quantizers: list[str]


def _disable(model: nn.Module, names: Sequence[str]) -> None:
    """Raises:
        ValueError: a name is not a quantizer of ``model``.
    """
    modules = dict(model.named_modules())
    for name in names:
        q = modules.get(name)
        if not isinstance(q, TensorQuantizer):
            raise ValueError(f"quantizers: '{name}' is not a quantizer of this model")
        q.quant_enabled = False


def keep_float(model: nn.Module, names: Iterable[str]) -> list[Unit]:
    """Disable the quantizers of the units named (see :func:`compress.quant.units`), in place, and record it.

    Args:
        names: unit names (a layer's module name, an attention module's, a graph unit's).

    Returns:
        The units now kept float.

    Raises:
        ValueError: a name is not one of the model's (enabled) units.
    """
    by_name = {u.name: u for u in units(model)}
    wanted = list(dict.fromkeys(names))
    unknown = [n for n in wanted if n not in by_name]
    if unknown:
        shown = ", ".join(list(by_name)[:8]) + (" ..." if len(by_name) > 8 else "")
        raise ValueError(f"'{unknown[0]}' is not a quantized unit of the model (units: {shown or 'none'})")
    chosen = [by_name[n] for n in wanted]
    if not chosen:
        return []
    quantizers = [q for u in chosen for q in u.quantizers]
    _disable(model, quantizers)
    structure.record(model, KIND, {"units": [u.name for u in chosen], "quantizers": quantizers})
    return chosen


def float_units(model: nn.Module) -> list[str]:
    """The unit names recorded as kept float on ``model`` (in the order they were kept)."""
    origin = structure.origin_of(model)
    if origin is None:
        return []
    return [n for entry in origin.structure if entry.get("kind") == KIND for n in entry["payload"]["units"]]


@structure.register_rebuild(KIND, FloatRecord)
def _rebuild(model: nn.Module, payload: FloatRecord) -> nn.Module:
    _disable(model, payload.quantizers)
    return model
