"""Forward hooks that keep the outputs of named layers (the features hint losses compare)."""

from __future__ import annotations

import torch
from torch import nn

from compress.errors import CompressError, did_you_mean


class Features:
    """Keeps the latest output of each named module of ``model``.

    With ``grad_only`` (the student) outputs are kept only while autograd is on, so evaluation
    passes under ``no_grad`` do not overwrite (or hold on to) training features.
    """

    def __init__(self, model: nn.Module, names: list[str], *, where: str, whose: str, grad_only: bool) -> None:
        modules = dict(model.named_modules())
        for name in names:
            if name not in modules or name == "":
                raise CompressError(f"{where}: the {whose} has no layer '{name}'{did_you_mean(name, modules)}")
        self.grad_only, self.probing, self.where, self.whose = grad_only, False, where, whose
        self.out: dict[str, torch.Tensor] = {}
        self._handles = [modules[name].register_forward_hook(self._keep(name, where, whose)) for name in names]

    def _keep(self, name: str, where: str, whose: str):  # noqa: ANN202 - a hook closure
        def hook(_module: nn.Module, _inputs: object, output: object) -> None:
            if self.grad_only and not (torch.is_grad_enabled() or self.probing):
                return
            if not isinstance(output, torch.Tensor):
                raise CompressError(f"{where}: the {whose} layer '{name}' returns {type(output).__name__}, not a tensor")
            self.out[name] = output

        return hook

    def take(self, name: str) -> torch.Tensor:
        """The layer's output from the last forward pass.

        Raises:
            CompressError: the layer did not run (e.g. a container inlined by a traced, quantized graph).
        """
        if name not in self.out:
            raise CompressError(
                f"{self.where}: the {self.whose} layer '{name}' did not run in the forward pass (after ptq/qat "
                "the model is a traced graph whose blocks are inlined: name a leaf layer such as 'layer2.conv2')"
            )
        return self.out.pop(name)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.out.clear()
