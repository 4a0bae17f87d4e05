"""PyTorch-native 2:4 inference on sparse tensor cores: Linear weights as ``torch.sparse`` semi-structured tensors.

Needs a CUDA GPU with sparse tensor cores (sm80+, Ampere or newer) and half-precision weights; on
anything else :func:`why_unavailable` says why and :func:`to_semi_structured` refuses. The TensorRT
engine (``BuilderFlag.SPARSE_WEIGHTS``) is the deployment path for convolutions; this one serves
Linear-heavy models run from PyTorch.
"""

from __future__ import annotations

import torch
from torch import nn

from compress.errors import CompressError, first_line
from compress.sparsity import eligible
from compress.sparsity.pattern import satisfies


def why_unavailable(device: torch.device | str | None = None) -> str | None:
    """Why semi-structured sparse kernels cannot run here, or None when they can."""
    if not hasattr(torch.sparse, "to_sparse_semi_structured"):
        return f"torch {torch.__version__} has no torch.sparse.to_sparse_semi_structured"
    if not torch.cuda.is_available():
        return "no CUDA GPU: semi-structured sparse kernels run on sparse tensor cores (sm80+ GPUs)"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"the GPU is sm{major}{minor}; sparse tensor cores need sm80 or newer"
    return None


@torch.no_grad()
def to_semi_structured(model: nn.Module, dtype: torch.dtype = torch.float16) -> dict[str, str]:
    """Swap each 2:4 Linear weight of ``model`` (on a CUDA device) for a semi-structured sparse tensor.

    The model must already be in ``dtype`` on the GPU (``model.half().cuda()``). Layers that are not
    2:4, not eligible, or whose shape the kernels reject stay dense.

    Returns:
        Per Linear layer, ``"sparse"`` or why it stayed dense.

    Raises:
        CompressError: no sm80+ CUDA GPU or no support in this torch build.
    """
    param = next(model.parameters(), None)
    why = why_unavailable(param.device if param is not None and param.is_cuda else None)
    if why is not None:
        raise CompressError(f"sparsity.to_semi_structured: {why}")
    result = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        weight = module.weight
        reason = eligible.why_ineligible(module)
        if reason is None and not weight.is_cuda:
            reason = "the weight is not on the GPU"
        if reason is None and weight.dtype != dtype:
            reason = f"the weight is {weight.dtype}, not {dtype}"
        if reason is None and not satisfies(weight):
            reason = "the weight is not 2:4"
        if reason is None:
            try:
                module.weight = nn.Parameter(torch.sparse.to_sparse_semi_structured(weight), requires_grad=False)
            except (RuntimeError, ValueError) as exc:  # shape or dtype the kernels do not take
                reason = first_line(exc)
        result[name] = reason or "sparse"
    return result
