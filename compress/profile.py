"""Model size and cost: parameters, nonzero parameters, multiply-accumulates (MACs).

MACs are counted on the operators forward actually runs, with the FLOP formulas of torch's own
counter (``torch.utils.flop_counter``; MACs = FLOPs / 2): convolutions (transposed and grouped
too), ``mm``/``addmm``/``bmm``/``baddbmm`` (so ``nn.Linear``, ``F.linear``, ``matmul``, ``einsum``
and attention's Q·Kᵀ and A·V) and fused attention kernels. Three gaps of torch's counter are
closed here: CPU's fused ``scaled_dot_product_attention`` kernel has no formula there (it would
count 0), ``mv``/``addmv``/``dot`` have none either, and ``nn.MultiheadAttention``'s inference
fast path runs one opaque kernel, so it is switched off while counting (the same maths then runs
as the matmuls above). Elementwise work (activations, normalisation, fake quantization) is not
MACs and not counted, so a fake-quant model counts as its float model.

Per module, a matmul or convolution goes to the module whose parameter it reads (so
``nn.MultiheadAttention.out_proj``, whose weight the attention's forward uses through
``F.linear`` without calling it, still gets its MACs); one that reads no parameter (attention
scores) or a computed weight (a fake-quantized copy) goes to the innermost module running.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import prod
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, sdpa_flop_count

from compress.attention import no_mha_fastpath
from compress.inputs import call_model, take

_aten = torch.ops.aten


def count_params(model: nn.Module) -> int:
    """Every parameter element of ``model``."""
    return sum(p.numel() for p in model.parameters())


def count_nonzero_params(model: nn.Module) -> int:
    """Parameter elements of ``model`` that are not zero (pruned or 2:4-masked weights are)."""
    return int(sum(int(torch.count_nonzero(p.detach())) for p in model.parameters()))


@dataclass
class MacsProfile:
    """MACs of one sample: the total, per module name, and per parameter name (matmuls that read it)."""

    total: int = 0
    modules: dict[str, int] = field(default_factory=dict)
    params: dict[str, int] = field(default_factory=dict)

    @property
    def unweighted(self) -> int:
        """MACs of matmuls that read no parameter (attention's Q·Kᵀ and A·V, activation products)."""
        return self.total - sum(self.params.values())


def _shape_formula(fn: Any) -> Any:
    """A raw-argument formula (as ``flop_registry`` holds them) from one on shapes."""
    def formula(*args: Any, out_val: Any = None, **kwargs: Any) -> int:
        shapes = [a.shape if isinstance(a, torch.Tensor) else a for a in args]
        return int(fn(*shapes))
    return formula


def _extra_formulas() -> dict[Any, Any]:
    """FLOP formulas torch's counter lacks, for operators eager forward runs (``getattr``: older torch lacks some)."""
    sdpa = _shape_formula(lambda q, k, v, *_: sdpa_flop_count(q, k, v))
    extra = {
        "_scaled_dot_product_flash_attention_for_cpu": sdpa,  # CPU's fused SDPA kernel
        "mv": _shape_formula(lambda a, b, *_: 2 * a[0] * a[1]),
        "addmv": _shape_formula(lambda _c, a, b, *_: 2 * a[0] * a[1]),
        "dot": _shape_formula(lambda a, b, *_: 2 * a[0]),
        "vdot": _shape_formula(lambda a, b, *_: 2 * a[0]),
        "addbmm": _shape_formula(lambda _c, a, b, *_: 2 * prod(a) * b[-1]),
    }
    return {getattr(_aten, name): fn for name, fn in extra.items() if hasattr(_aten, name)}


_FORMULAS = {**flop_registry, **_extra_formulas()}
# their first argument is the term added (a bias), not a factor of the product
_ADDED_FIRST = {getattr(_aten, n) for n in ("addmm", "addmv", "baddbmm", "addbmm") if hasattr(_aten, n)}


class _Counter(TorchDispatchMode):
    """Adds up the formulas of the operators that run, attributed to a module and a parameter name."""

    def __init__(self, owners: dict[int, list[tuple[str, str]]], stack: list[str]) -> None:
        super().__init__()
        self.owners = owners  # storage address -> [(module name, parameter name)]
        self.stack = stack  # names of the modules running, innermost last
        self.profile = MacsProfile()
        self.whole: set[Any] = set()  # operators that do not decompose (most of them): skip asking again

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        packet = getattr(func, "_overloadpacket", func)
        formula = _FORMULAS.get(packet)
        if formula is None:
            if func not in self.whole and func is not torch.ops.prim.device.default:
                with self:  # a composite op that reaches us whole: count what it decomposes into
                    out = func.decompose(*args, **kwargs)
                if out is not NotImplemented:
                    return out
                self.whole.add(func)
            return func(*args, **kwargs)
        out = func(*args, **kwargs)
        macs = int(formula(*args, **kwargs, out_val=out)) // 2
        if macs:
            self._add(macs, args[1:] if packet in _ADDED_FIRST else args)
        return out

    def _add(self, macs: int, factors: tuple[Any, ...]) -> None:
        here = self.stack[-1] if self.stack else ""
        module, param = here, None
        for a in factors:
            found = self.owners.get(_address(a)) if isinstance(a, torch.Tensor) else None
            if found:  # the running module's own parameter first (tied weights), else its owner
                module, param = next(((m, p) for m, p in found if m == here), found[0])
                break
        p = self.profile
        p.total += macs
        p.modules[module] = p.modules.get(module, 0) + macs
        if param is not None:
            p.params[param] = p.params.get(param, 0) + macs


def _address(t: torch.Tensor) -> int | None:
    """Where a tensor's memory starts (views of a parameter share it), or None for one without plain storage."""
    if not t.numel() or t.device.type == "meta":
        return None
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError, TypeError):  # sparse layouts, wrapper subclasses
        return None


def _enter(stack: list[str], name: str) -> Any:
    def hook(_module: nn.Module, _inputs: Any) -> None:
        stack.append(name)
    return hook


def _leave(stack: list[str]) -> Any:
    def hook(_module: nn.Module, _inputs: Any, _output: Any) -> None:
        if stack:
            stack.pop()
    return hook


@torch.no_grad()
def profile_macs(model: nn.Module, example: torch.Tensor) -> MacsProfile:
    """MACs of one sample (``example[:1]``) through ``model`` in eval mode, per module and per parameter.

    Args:
        model: any module; quantized (fake-quant) models count their float matmuls.
        example: a batch the model accepts; only its first sample runs.

    Returns:
        The total, the per-module attribution (keys are ``named_modules`` names, ``""`` for the
        model itself) and the MACs of the matmuls/convolutions reading each parameter.
    """
    owners: dict[int, list[tuple[str, str]]] = {}
    stack: list[str] = []
    handles = []
    for name, mod in model.named_modules():
        for pname, p in mod.named_parameters(prefix=name, recurse=False):
            address = _address(p)
            if address:
                owners.setdefault(address, []).append((name, pname))
        handles.append(mod.register_forward_pre_hook(_enter(stack, name)))
        handles.append(mod.register_forward_hook(_leave(stack), always_call=True))
    was_training = model.training
    model.eval()
    counter = _Counter(owners, stack)
    try:
        with no_mha_fastpath(), counter:
            call_model(model, take(example, slice(0, 1)))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return counter.profile


def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    """MACs of one sample through ``model``: every convolution and matmul (see :func:`profile_macs`)."""
    return profile_macs(model, example).total


def layer_macs(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """MACs of one sample per module name (summed if forward calls it twice); see :func:`profile_macs`.

    A layer's own matmuls go to it, matmuls a parent runs functionally (attention scores) to the
    parent; a layer whose parameter is read without calling it (``MultiheadAttention.out_proj``) gets them.
    """
    return profile_macs(model, example).modules


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the parameters at the precision they deploy in: one a weight whose (enabled) weight quantizer makes
    it INT8, the tensor's own element size for the rest (biases, norms, layers kept float)."""
    from compress.quant.quantizer import TensorQuantizer

    total = 0
    for module in model.modules():
        quantizer = getattr(module, "weight_quantizer", None)
        int8 = isinstance(quantizer, TensorQuantizer) and quantizer.quant_enabled
        for name, p in module.named_parameters(recurse=False):
            total += p.numel() * (1 if int8 and name == "weight" else p.element_size())
    return total


def size_stats(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """``params``, ``nonzero_params``, ``weight_bytes`` and ``macs`` of a model, as report.json lists them."""
    return {"params": count_params(model), "nonzero_params": count_nonzero_params(model),
            "weight_bytes": weight_bytes(model), "macs": count_macs(model, example)}
