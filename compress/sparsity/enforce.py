"""2:4 masks the model keeps itself: a forward pre-hook on every sparse layer.

A training callback or an optimizer hook keeps masks only in the loop that installed it: a user's own
loop with a new optimizer, a deep copy or ``quant.prepare`` lost them. Instead each sparse layer carries a
:class:`KeepMask` forward pre-hook holding its keep-mask. Before the layer runs, the hook

- zeroes the masked weights again if the weight was written since it last looked (an optimizer step,
  ``load_state_dict``: the tensor's version counter moved; a deep copy: a new tensor), and
- masks the weight's gradient (a tensor hook), so any optimizer whose update of a zero weight with a
  zero gradient and zero state is zero (SGD with momentum and weight decay, Adam, AdamW, RMSprop, ...)
  leaves masked weights at zero after its step too: a model saved right after ``optimizer.step()`` is 2:4.

Why a pre-hook and not ``torch.nn.utils.parametrize``: a parametrization changes the layer's class
(``ParametrizedConv2d``), which the exact-type tables of ``quant.prepare`` refuse, renames the weight in
the state_dict (``parametrizations.weight.original``), and exports the weight as a ``Mul`` of two
initializers instead of one plain initializer. The hook keeps the class, the state_dict and the ONNX
weights as they are, and module hooks survive ``copy.deepcopy`` and ``quant.prepare`` (which shares the
float layer's hooks); under ``torch.onnx.export`` the fix-up runs outside the trace.

Writes through ``.data`` bump no version and go unseen until :func:`compress.save` (or ``load``) refuses
the model.
"""

from __future__ import annotations

import torch
from torch import nn

from compress.eager import changed_since, outside_trace, stamp
from compress.sparsity import targets


class KeepMask:
    """Forward pre-hook of one sparse layer (or attention with a packed ``in_proj_weight``).

    Attributes:
        attr: the parameter it keeps (``weight`` or ``in_proj_weight``).
        mask: the keep-mask (bool, the parameter's shape).
    """

    def __init__(self, attr: str, mask: torch.Tensor) -> None:
        self.attr = attr
        self.mask = mask.bool()
        self._seen: tuple[int, int] | None = None  # (id, version) of the weight as last masked
        self._grad_hooked: int | None = None  # id of the weight whose gradient is masked
        self.active = True  # False once removed: the tensor hook on the gradient then passes it through

    def __call__(self, module: nn.Module, args: object) -> None:
        weight = getattr(module, self.attr, None)
        if isinstance(weight, torch.Tensor):
            self.enforce(weight)

    def enforce(self, weight: torch.Tensor) -> None:
        """Zero the masked weights if they may have moved, and mask the gradient from now on."""
        if self.mask.device != weight.device:
            self.mask = self.mask.to(weight.device)
        if changed_since(weight, self._seen):
            with outside_trace():
                weight.mul_(self.mask)
            self._seen = stamp(weight)
        if weight.requires_grad and self._grad_hooked != id(weight):  # tensor hooks do not survive deepcopy
            weight.register_hook(self._mask_grad)
            self._grad_hooked = id(weight)

    def _mask_grad(self, grad: torch.Tensor) -> torch.Tensor:
        return grad * self.mask.to(grad.device, grad.dtype) if self.active else grad


def _owner(model: nn.Module, binding: targets.Binding) -> tuple[nn.Module, str]:
    if targets.is_packed(binding.name):
        return model.get_submodule(binding.name.rpartition(".")[0]), targets.IN_PROJ
    return model.get_submodule(binding.name), "weight"


def remove(model: nn.Module) -> None:
    """Take every :class:`KeepMask` hook off ``model``'s modules (the masks stay recorded)."""
    for module in model.modules():
        for key in [k for k, hook in module._forward_pre_hooks.items() if isinstance(hook, KeepMask)]:
            module._forward_pre_hooks.pop(key).active = False


def install(model: nn.Module, masks: dict[str, tuple[targets.Binding, torch.Tensor]]) -> None:
    """Put one :class:`KeepMask` on each layer ``masks`` binds (replacing older ones), and mask the weights now.

    Args:
        masks: per layer name, its binding and its keep-mask (the binding's rows of the entry's mask).
    """
    remove(model)
    for binding, mask in masks.values():
        module, attr = _owner(model, binding)
        hook = KeepMask(attr, mask)
        module.register_forward_pre_hook(hook)
        hook.enforce(binding.weight)


def hooks(model: nn.Module) -> dict[str, KeepMask]:
    """The :class:`KeepMask` hooks on ``model``, by module name."""
    return {name: hook for name, m in model.named_modules() for hook in m._forward_pre_hooks.values()
            if isinstance(hook, KeepMask)}
