"""L1 (magnitude) unstructured pruning of Conv/Linear weights, one-shot or gradual, masks held in training."""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum
from typing import Any

import torch
from torch import nn

from compress.callbacks import Callback, TrainState
from compress.errors import CompressError, parse_enum
from compress.prune.schedule import Schedule
from compress.select import select_names

WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)


class Scope(str, Enum):
    local = "local"  # every layer loses the same fraction of its weights
    global_ = "global"  # one magnitude threshold across all selected layers


def weighted_layers(model: nn.Module) -> list[str]:
    """Names of the Conv*/ConvTranspose*/Linear layers (subclasses included)."""
    return [name for name, m in model.named_modules() if isinstance(m, WEIGHTED) and name]


def check_ratio(ratio: float, where: str, key: str = "ratio") -> float:
    if not 0.0 <= ratio < 1.0:
        raise CompressError(f"{where}.{key}: {ratio} is outside [0, 1)")
    return float(ratio)


@torch.no_grad()
def magnitude_masks(weights: dict[str, torch.Tensor], ratio: float, scope: Scope | str) -> dict[str, torch.Tensor]:
    """Boolean keep-masks removing exactly ``round(ratio * n)`` smallest-|w| weights (per layer or overall)."""
    if Scope(scope) is Scope.local:
        return {name: _keep_largest(w.abs().flatten(), ratio).view_as(w) for name, w in weights.items()}
    flat = torch.cat([w.detach().abs().flatten().float() for w in weights.values()])
    keep = _keep_largest(flat, ratio)
    masks, start = {}, 0
    for name, w in weights.items():
        masks[name] = keep[start : start + w.numel()].view_as(w)
        start += w.numel()
    return masks


def _keep_largest(values: torch.Tensor, ratio: float) -> torch.Tensor:
    k = round(ratio * values.numel())
    keep = torch.ones_like(values, dtype=torch.bool)
    if k > 0:  # stable sort: among equal magnitudes the earlier weight goes first, deterministically
        keep[torch.sort(values, stable=True).indices[:k]] = False
    return keep


class MagnitudePruner:
    """Zeroes the smallest-magnitude weights of Conv/Linear layers and keeps them zero while training.

    One-shot: ``MagnitudePruner(model, ratio=0.8)`` masks at once. Gradual: pass ``schedule`` and the
    number of optimizer steps; the ratio then rises at the schedule's update points. Call
    :meth:`step` after every ``optimizer.step()`` (or pass :meth:`callback` to ``compress.finetune``),
    then :meth:`make_permanent` when training ends.

    Args:
        model: pruned in place.
        ratio: fraction of the selected weights to zero, in [0, 1) (one-shot).
        schedule: gradual pruning instead of ``ratio``.
        total_steps: optimizer steps of the fine-tune the schedule spans (default: told by ``callback``).
        scope: ``local`` (per layer) or ``global`` (one threshold).
        include/exclude: layer-name patterns.

    Raises:
        CompressError: a ratio outside [0, 1), a pattern matching no layer, neither or both of ratio/schedule.
    """

    def __init__(
        self,
        model: nn.Module,
        ratio: float | None = None,
        *,
        schedule: Schedule | None = None,
        total_steps: int | None = None,
        scope: Scope | str = Scope.local,
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
        where: str = "prune",
    ) -> None:
        if (ratio is None) == (schedule is None):
            raise CompressError(f"{where}: give either ratio (one-shot) or schedule (gradual)")
        if schedule is not None:
            schedule.check(f"{where}.schedule")
        self.scope = parse_enum(Scope, scope, f"{where}.scope")
        names = select_names(weighted_layers(model), include, exclude, where=where, what="Conv/Linear layer to prune")
        self.layers: dict[str, nn.Module] = {n: model.get_submodule(n) for n in names}
        self.masks: dict[str, torch.Tensor] = {}
        self.schedule = schedule
        self.ratio = 0.0
        self._step = 0
        self._updates: dict[int, float] = {}
        if schedule is None:
            self.prune_to(check_ratio(float(ratio), where))  # type: ignore[arg-type]
        elif total_steps is not None:
            self.start(total_steps)

    def start(self, total_steps: int) -> None:
        """Lay the schedule over ``total_steps`` optimizer steps and apply its first update."""
        assert self.schedule is not None
        self._updates = self.schedule.updates(total_steps)
        self._step = 0
        self.prune_to(self._updates.pop(0, self.schedule.start_ratio))

    @torch.no_grad()
    def prune_to(self, ratio: float) -> None:
        """Recompute masks from the current weights at ``ratio`` and zero the pruned weights."""
        self.ratio = ratio
        self.masks = magnitude_masks({n: m.weight for n, m in self.layers.items()}, ratio, self.scope)
        self.apply()

    @torch.no_grad()
    def apply(self) -> None:
        """Zero the masked weights again (after an optimizer step moved them)."""
        for name, mask in self.masks.items():
            weight = self.layers[name].weight
            if mask.device != weight.device:  # the model moved (e.g. to the GPU) since the masks were made
                self.masks[name] = mask = mask.to(weight.device)
            weight.mul_(mask)

    @property
    def done(self) -> bool:
        """Every scheduled update has been applied: the weights are at the final ratio."""
        return not self._updates

    def step(self) -> None:
        """After each optimizer step: apply the schedule's update due now, else re-apply the masks."""
        self._step += 1
        if self._step in self._updates:
            self.prune_to(self._updates.pop(self._step))
        else:
            self.apply()

    def make_permanent(self) -> dict[str, Any]:
        """Zero the masked weights one last time and drop the masks; returns the per-layer counts."""
        self.apply()
        self.masks = {}
        return self.stats()

    def stats(self) -> dict[str, Any]:
        """True counts from the weights: ``{"ratio", "weights", "nonzero", "layers": {name: {...}}}``."""
        layers = {}
        for name, m in self.layers.items():
            total, nonzero = m.weight.numel(), int(torch.count_nonzero(m.weight))
            layers[name] = {"weights": total, "nonzero": nonzero, "sparsity": round(1 - nonzero / total, 6)}
        total = sum(v["weights"] for v in layers.values())
        nonzero = sum(v["nonzero"] for v in layers.values())
        return {"ratio": self.ratio, "weights": total, "nonzero": nonzero,
                "sparsity": round(1 - nonzero / max(total, 1), 6), "layers": layers}

    def callback(self) -> Callback:
        """A ``compress.finetune`` callback: starts the schedule and keeps the masks after every step."""
        return _MaskCallback(self)


class _MaskCallback(Callback):
    def __init__(self, pruner: MagnitudePruner) -> None:
        self.pruner = pruner

    def on_train_start(self, state: TrainState) -> None:
        if self.pruner.schedule is not None:
            self.pruner.start(state.total_steps)

    def after_step(self, state: TrainState) -> None:
        self.pruner.step()

    def epoch_is_result(self, state: TrainState) -> bool:
        return self.pruner.done



def l1_unstructured(model: nn.Module, ratio: float | None = None, **options: Any) -> MagnitudePruner:
    """Magnitude-prune ``model``'s Conv/Linear weights in place; options as :class:`MagnitudePruner`
    (``schedule``, ``total_steps``, ``scope``, ``include``, ``exclude``).

    Example::

        pruner = compress.prune.l1_unstructured(model, ratio=0.8, scope="global")
        for x, y in loader:
            loss = F.cross_entropy(model(x), y); opt.zero_grad(); loss.backward(); opt.step()
            pruner.step()                  # pruned weights stay zero
        pruner.make_permanent()
    """
    return MagnitudePruner(model, ratio, where="prune.l1_unstructured", **options)
