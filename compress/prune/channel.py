"""Structured channel pruning: remove whole output channels (and all that depends on them).

Which channels go is decided here: importance per coupled group (L1, L2 or BatchNorm scale), per
layer (``local``) or across the model (``global``), rounded up to a multiple of ``round_to`` channels
(default 8: what ONNX Runtime's NCHWc-blocked CPU convolutions and tensor cores want), to a ratio or
to a target MACs reduction, in one or several steps. The surgery itself runs through Torch-Pruning's
dependency graph (``graph.py``); the resulting shapes are recorded for pickle-free checkpoints.
"""

from __future__ import annotations

import copy
import math
import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress import structure
from compress.errors import CompressError, first_line, parse_enum
from compress.export.options import OnnxRuntimeEngine, TensorRTEngine
from compress.inputs import call_model, move_inputs
from compress.outputs import named
from compress.profile import count_macs
from compress.prune import graph, heads, plan
from compress.prune.engine_timer import Engine
from compress.prune.latency_search import LatencySearch  # noqa: F401  (the record channels() returns)
from compress.prune.latency_target import LatencyTarget, engine_multiple, latency_target
from compress.prune.to_latency import api_engine, search_latency
from compress.prune.unstructured import Scope, check_ratio, weighted_layers
from compress.select import select_names


class Importance(str, Enum):
    l1 = "l1"  # sum of |w| of a channel over every layer of its group
    l2 = "l2"
    bn_scale = "bn_scale"  # |gamma| of the BatchNorms in the group (network slimming); l1 where none


# Kept channel counts are multiples of this unless told otherwise: ONNX Runtime's CPU convolutions at level
# `all` block channels by 8 (NCHWc) and fall back to far slower kernels otherwise (a MobileNetV2 pruned to half
# its MACs ran 3.4x slower unrounded); tensor cores want multiples of 8 too.
DEFAULT_ROUND_TO = 8
# A MACs target reached this much further than asked (achieved / requested) is worth saying.
OVERSHOOT = 1.1
# The structure kind of 2:4 masks (``compress.sparsity.masks.KIND``): masks fix every weight's shape, so a model
# carrying them cannot lose channels. Asked through compress.structure: prune stays below sparsity.
_SPARSITY = "sparsity"


@dataclass(frozen=True)
class ChannelOptions:
    importance: Importance = Importance.l1
    scope: Scope = Scope.local
    round_to: int = DEFAULT_ROUND_TO  # keep a multiple of this many channels; 1: no rounding
    include: tuple[str, ...] = ()  # layers whose output channels may go (a coupled group needs all of them)
    exclude: tuple[str, ...] = ()
    heads: heads.HeadOptions = field(default_factory=heads.HeadOptions)  # groups of attention heads


class _TooFar(CompressError):
    """Pruning at this ratio would leave a layer with no channel."""


def _scorer(kind: Importance) -> Any:
    import torch_pruning as tp

    if kind is Importance.bn_scale:
        return tp.importance.BNScaleImportance()
    return tp.importance.GroupMagnitudeImportance(p=1 if kind is Importance.l1 else 2)


@dataclass
class ChannelPruner:
    """Prunes ``model``'s output channels in place, possibly over several steps.

    ``ratio`` always counts against the channels each group had at the first step, so steps of
    0.25 then 0.5 end with half the channels gone. Call :meth:`finish` to record the plan.

    Args:
        model: pruned in place.
        example: one input batch; the dependency graph is traced on it.
        options: importance, scope, round_to, include/exclude.
        where: the recipe location or API name that errors start with.

    Raises:
        CompressError: the tracer cannot follow the model, a pattern matches nothing, no group is prunable.
    """

    model: nn.Module
    example: torch.Tensor
    options: ChannelOptions = field(default_factory=ChannelOptions)
    where: str = "prune"
    initial: dict[str, int] = field(default_factory=dict)  # group root -> units at the first step
    _current: str = field(default="", init=False, repr=False)  # the group being pruned, for error messages

    def __post_init__(self) -> None:
        if structure.has(self.model, _SPARSITY):
            raise CompressError(f"{self.where}: the model is 2:4 sparse; channel pruning would break its masks "
                                "(prune before sparsity)")
        param = next(self.model.parameters(), None)
        if param is not None:
            self.example = move_inputs(self.example, param.device)
        try:
            self._out_shape = self._output_shape(self.model)
        except Exception as exc:  # a user's forward can raise anything
            raise CompressError(f"{self.where}: the model's forward fails on the example input: {first_line(exc)}") from None
        self._before = plan.snapshot(self.model)
        self._heads_before = {name: heads.head_layout(m) for name, m in self.model.named_modules()}
        self.macs_before = count_macs(self.model, self.example)
        self.skipped: dict[str, str] = {}  # group root -> why it was kept, at the last prune()

    def prune(self, ratio: float, attention_ratio: float | None = None) -> dict[str, list[int]]:
        """Prune each group to ``1 - ratio`` of its first-step channels; returns ``{root: [before, after]}``.

        ``attention_ratio``: the ratio of the attention-head groups (with ``nn.MultiheadAttention``, the
        embedding) when it differs (a MACs target refines the MLP widths with the embedding's coarser steps held).
        """
        check_ratio(ratio, self.where)
        backup, initial = copy.deepcopy(self.model), dict(self.initial)
        self.skipped = {}
        try:
            changed = self._prune(self.model, ratio, self.initial, self.skipped, attention_ratio=attention_ratio)
            failure = self._forward_failure(self.model)
        except BaseException as exc:
            self._restore(backup, initial)  # the model stays as it was before this call
            if isinstance(exc, CompressError) or not isinstance(exc, Exception):
                raise
            raise CompressError(f"{self.where}: pruning the output channels of layer '{self._current}' fails "
                                f"({first_line(exc)}); exclude it") from None
        if failure is not None:
            self._restore(backup, initial)
            raise self._localised(ratio, failure, list(changed))
        frozen = {n for n, p in backup.named_parameters() if not p.requires_grad}
        for name, param in self.model.named_parameters():  # resized parameters are new: keep them frozen
            if name in frozen:
                param.requires_grad_(False)
        return changed

    def _restore(self, backup: nn.Module, initial: dict[str, int]) -> None:
        self.model.__dict__.clear()
        self.model.__dict__.update(backup.__dict__)
        self.initial = initial

    def _localised(self, ratio: float, failure: str, roots: list[str]) -> CompressError:
        """The error for a forward that pruning broke, naming the first group whose pruning alone breaks it."""
        culprit = next((root for root in roots if self._forward_failure(self._prune_copy(ratio, root))), None)
        return CompressError(f"{self.where}: " + (f"pruning the output channels of layer '{culprit}' " if culprit
                                                  else "pruning ") + failure)

    def prune_to_macs(self, reduction: float, *, tolerance: float = 1 / 256) -> tuple[float, dict[str, list[int]]]:
        """Prune until MACs(before) / MACs(after) reaches ``reduction``; returns the ratio used and the changes.

        The ratio is found by bisection on copies of the model (each probe prunes a copy and counts MACs).

        Raises:
            CompressError: ``reduction`` <= 1, or no ratio up to 0.99 reaches it.
        """
        if reduction <= 1.0:
            raise CompressError(f"{self.where}.macs_reduction: {reduction} must be > 1")
        target = self.macs_before / reduction

        def macs_at(ratio: float, attention: float | None = None) -> int | None:
            probe = copy.deepcopy(self.model)
            try:
                changed = self._prune(probe, ratio, dict(self.initial), {}, attention_ratio=attention)
            except _TooFar:  # a layer would lose every channel (scope: global): too far
                return None
            except CompressError:
                raise
            except Exception:  # raise what prune() would say, naming the layer (the model is restored)
                self.prune(ratio, attention)
                raise
            failure = self._forward_failure(probe)
            if failure is not None:
                raise self._localised(ratio, failure, list(changed))
            return count_macs(probe, self.example)

        def bisect(low: float, attention: float | None) -> tuple[float, float]:
            high = 0.99
            while high - low > tolerance:
                mid = (low + high) / 2
                macs = macs_at(mid, attention)
                low, high = (mid, high) if macs is not None and macs > target else (low, mid)
            return low, high

        low, high = bisect(0.0, None)
        reached = macs_at(high)
        if reached is None or reached > target:
            best = macs_at(low) or self.macs_before
            hint = f" (round_to: {self.options.round_to}; 1 allows finer steps)" if self.options.round_to > 1 else ""
            raise CompressError(f"{self.where}.macs_reduction: {reduction:g}x is out of reach; pruning gets at most "
                                f"about {self.macs_before / max(best, 1):.2f}x{hint}")
        if self._has_attention() and self.macs_before / reached > reduction * OVERSHOOT:
            # the embedding moves in whole head-dim (or head) steps, which the shared ratio may overshoot by
            # far: hold it one step short and let the other groups go further
            rest = bisect(low, low)[1]
            finer = macs_at(rest, low)
            if finer is not None and target >= finer > reached:
                return rest, self.prune(rest, low)
        return high, self.prune(high)

    def pruned_copy(self, ratio: float) -> nn.Module | None:
        """A copy of the model pruned at ``ratio`` (the model itself unchanged), or None when that ratio would
        remove every channel of a layer (scope ``global``): a latency search's candidate.

        Raises:
            CompressError: pruning breaks the forward or a layer cannot be pruned (naming the layer).
        """
        check_ratio(ratio, self.where)
        probe = copy.deepcopy(self.model)
        try:
            changed = self._prune(probe, ratio, dict(self.initial), {})
        except _TooFar:
            return None
        except CompressError:
            raise
        except Exception:  # raise what prune() would say, naming the layer (the model is restored)
            self.prune(ratio)
            raise
        failure = self._forward_failure(probe)
        if failure is not None:
            raise self._localised(ratio, failure, list(changed))
        return probe

    def _has_attention(self) -> bool:
        return has_attention(self.model)

    def heads(self) -> dict[str, dict[str, list[int]]]:
        """Per attention module (see :func:`heads.head_layout`): ``{"num_heads": [before, now], "head_dim": ...}``."""
        found = {}
        for name, module in self.model.named_modules():
            now, before = heads.head_layout(module), self._heads_before.get(name)
            if now is not None and before is not None:
                found[name] = {"num_heads": [before[0], now[0]], "head_dim": [before[1], now[1]]}
        return found

    def finish(self) -> dict[str, dict[str, Any]]:
        """Record the new shapes in the model's origin (for checkpoints); returns them per module."""
        return plan.record(self.model, self._before)

    # ------------------------------------------------------------------------------------------

    def _prune_copy(self, ratio: float, only: str) -> nn.Module:
        probe = copy.deepcopy(self.model)
        self._prune(probe, ratio, dict(self.initial), {}, only=only)
        return probe

    def _prune(self, model: nn.Module, ratio: float, initial: dict[str, int], skipped: dict[str, str],
               only: str | None = None, attention_ratio: float | None = None) -> dict[str, list[int]]:
        opts = self.options
        selected = set(select_names(weighted_layers(model), opts.include, opts.exclude,
                                    where=self.where, what="Conv/Linear layer to prune"))
        traced = graph.trace(model, self.example, self.where)
        dg, frozen = traced.dg, traced.output_layers
        lost = [name for name in traced.lost if name in selected]
        if lost:
            raise CompressError(
                f"{self.where}: the dependency tracer cannot follow the model past layer '{lost[0]}': its output "
                "leaves autograd (.detach(), .numpy(), torch.no_grad() in forward); exclude it or keep forward differentiable"
            )
        chosen: list[graph.Group] = []
        for g in graph.groups(dg, model):
            why = self._why_skipped(g, selected, frozen)
            if why:
                skipped[g.root] = why
            elif only in (None, g.root):
                chosen.append(g)
        if not chosen:
            raise CompressError(f"{self.where}: no channel group can be pruned ({self._skip_summary(skipped)})")
        scores = {g.root: self._score(g) for g in chosen}
        for g in chosen:
            initial.setdefault(g.root, g.units)
            if g.attention is not None:
                initial.setdefault(f"{g.root}/heads", g.attention.num_heads)
                initial.setdefault(f"{g.root}/head_dim", g.attention.head_dim)
        plain = [g for g in chosen if g.attention is None]
        counts = self._counts(plain, scores, ratio, initial) if plain else {}
        changed = {}
        for g in chosen:
            self._current = g.root
            if g.attention is not None:
                first = (initial[f"{g.root}/heads"], initial[f"{g.root}/head_dim"])
                cut = heads.choose(g.attention, scores[g.root], ratio if attention_ratio is None else attention_ratio,
                                   first, self.options.heads, self.options.round_to)
                idxs = g.attention.expand(cut.idxs)
            else:
                n = counts[g.root]
                order = torch.argsort(scores[g.root], stable=True)[:n]
                idxs = torch.cat([order + k * g.units for k in range(g.ch_groups)]).tolist()
            if not idxs:
                continue
            root = model.get_submodule(g.root)
            group = dg.get_pruning_group(root, g.tp_group[0].dep.handler, idxs)
            if not dg.check_pruning_group(group):
                raise self._every_channel(g, ratio)
            if g.attention is not None:
                old_heads = g.attention.num_heads
                heads.set_heads(g.attention, cut.num_heads)
                group.prune()
                heads.sync(model, g.attention, cut, g.channels, old_heads)
            else:
                group.prune()
            changed[g.root] = [g.channels, g.channels - len(idxs)]
        return changed

    def _why_skipped(self, g: graph.Group, selected: set[str], frozen: set[str]) -> str | None:
        if g.channels <= 1:
            return "a single channel"
        if g.unsupported:
            return g.unsupported
        if g.attention is not None and not (self.options.heads.prune_num_heads or self.options.heads.prune_head_dims):
            return "attention heads: prune_num_heads and prune_head_dims are both off"
        if g.attention is not None and g.attention.per_head_norm:
            return (f"'{g.attention.per_head_norm}' normalises q or k over head_dim, which the dependency tracer "
                    "cannot follow: the heads stay")
        for layer in g.layers:
            if layer in frozen:
                return f"feeds the model's output through '{layer}'"
            if layer not in selected:
                return ("left out by include/exclude" if layer == g.root
                        else f"coupled with '{layer}', which include/exclude leaves out")
        return None

    def _skip_summary(self, skipped: dict[str, str]) -> str:
        shown = [f"{root}: {why}" for root, why in list(skipped.items())[:3]]
        return "; ".join(shown) or "the model has no Conv/Linear output channels to remove"

    def _score(self, g: graph.Group) -> torch.Tensor:
        imp = _scorer(self.options.importance)(g.tp_group)
        if imp is None:  # bn_scale on a group without BatchNorm
            imp = _scorer(Importance.l1)(g.tp_group)
        imp = imp.detach().float().cpu()
        if g.attention is not None:
            return heads.attention_scores(g.attention, imp)
        return imp.view(g.ch_groups, -1).mean(0) if g.ch_groups > 1 else imp

    def _counts(self, chosen: list[graph.Group], scores: dict[str, torch.Tensor], ratio: float,
                initial: dict[str, int]) -> dict[str, int]:
        """Channels (per conv group) each group loses now."""
        if Scope(self.options.scope) is Scope.local:
            keep = {g.root: initial[g.root] - math.floor(initial[g.root] * ratio) for g in chosen}
        else:
            total0 = sum(initial[g.root] for g in chosen)
            gone = total0 - sum(g.units for g in chosen)
            need = max(math.floor(total0 * ratio) - gone, 0)
            flat = torch.cat([scores[g.root] for g in chosen])
            lowest = torch.zeros(len(flat), dtype=torch.bool)
            lowest[torch.argsort(flat, stable=True)[:need]] = True
            keep, start = {}, 0
            for g in chosen:
                keep[g.root] = g.units - int(lowest[start : start + g.units].sum())
                start += g.units
        counts = {}
        for g in chosen:
            k = keep[g.root]
            if self.options.round_to > 1 and g.ch_groups == 1:  # up, so a layer never rounds to 0 channels
                k = min(math.ceil(k / self.options.round_to) * self.options.round_to, g.units)
            if k <= 0:
                raise self._every_channel(g, ratio)
            counts[g.root] = max(g.units - k, 0)
        return counts

    def _every_channel(self, g: graph.Group, ratio: float) -> CompressError:
        return _TooFar(
            f"{self.where}: ratio {ratio:g} ({Scope(self.options.scope).value}) would remove every output channel "
            f"of layer '{g.root}'; lower the ratio, exclude the layer, or use scope: local"
        )

    @torch.no_grad()
    def _output_shape(self, model: nn.Module) -> Any:
        was_training = model.training
        model.eval()
        try:
            out = call_model(model, self.example)
        finally:
            model.train(was_training)
        if isinstance(out, torch.Tensor):
            return tuple(out.shape)
        try:  # several outputs: every one must keep its shape
            return {name: tuple(t.shape) for name, t in named(out).items()}
        except CompressError:
            return None

    def _forward_failure(self, model: nn.Module) -> str | None:
        """Why the pruned model no longer works (forward fails or its output shape changed), or None."""
        try:
            shape = self._output_shape(model)
        except Exception as exc:  # a user's forward can raise anything
            return (f"breaks the model's forward ({first_line(exc)}); a reshape in forward likely hard-codes "
                    "a channel count: exclude that layer")
        if shape != self._out_shape:
            return (f"changes the model's output shape from {list(self._out_shape or [])} to {list(shape or [])}: "
                    "exclude the layer that produces the output")
        return None


def channels(
    model: nn.Module,
    example_input: torch.Tensor,
    ratio: float | None = None,
    *,
    macs_reduction: float | None = None,
    latency: LatencyTarget | Mapping[str, Any] | float | None = None,
    engine: Engine | OnnxRuntimeEngine | TensorRTEngine | None = None,
    workdir: str | os.PathLike[str] | None = None,
    importance: Importance | str = Importance.l1,
    scope: Scope | str = Scope.local,
    round_to: int | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    prune_num_heads: bool = False,
    prune_head_dims: bool = True,
    head_pruning_ratio: float | None = None,
) -> Any:
    """Remove output channels of ``model`` in place, with everything that depends on them; returns it, or
    with ``latency`` the search's record (:class:`LatencySearch`, the model as its ``model``).

    The model gets physically smaller (fewer filters, smaller BatchNorms and next-layer inputs), across
    residual adds, concatenations, depthwise/grouped convs and Linear heads. The layer producing the
    model's output keeps its channels. Fine-tune afterwards (``compress.finetune``).

    Args:
        example_input: a batch the model accepts; the dependency graph is traced on it.
        ratio: fraction of each group's output channels to remove, in [0, 1). Removing 50% of the
            channels of a conv net cuts its MACs about 4x (inputs and outputs both halve).
        macs_reduction: instead of ``ratio``: target MACs(before) / MACs(after), e.g. 2.0.
        latency: instead of ``ratio``: the pruned engine's latency over the unpruned one's, e.g. 0.5, or
            :class:`LatencyTarget` (``target``, ``batch_size`` 8, ``backend``, ``threads``, ``candidates`` 6,
            ``repeats`` 5, ``rounds`` 5). Exactly ``candidates`` pruned copies are exported, built into
            engines and timed interleaved with the unpruned engine (fewer only when the search converges);
            the least pruned one whose median ratio is at or below the target is kept, else the fastest
            (met when within half the interquartile range of its runs; else the record says how close).
        engine: how the deployed engine is built: :class:`Engine` (backend, threads, ONNX Runtime level,
            precision, ``int8`` to time INT8 engines of calibrated copies) or the export stage's engine
            options (``OnnxRuntimeEngine``/``TensorRTEngine``). Default: ONNX Runtime CPU, level ``all``.
        workdir: where the candidates' files go while timed (default: the system's temporary folder).
        importance: ``l1`` (default), ``l2`` or ``bn_scale``.
        scope: ``local`` (each group loses ``ratio``) or ``global`` (one ranking across groups).
        round_to: keep a multiple of this many channels per layer (rounded up, never to 0); default
            ``DEFAULT_ROUND_TO`` (8, what ONNX Runtime's CPU kernels and tensor cores want), with ``latency``
            the timed engine's multiple (:func:`engine_multiple`); 1: no rounding.
        include/exclude: layer-name patterns of the layers whose output channels may go.
        prune_num_heads: in groups of attention heads (``nn.MultiheadAttention``, whose width is a ViT's
            embedding; Hugging Face and timm q/k/v projections), remove whole heads.
        prune_head_dims: there, remove the same number of channels inside every head (default).
        head_pruning_ratio: fraction of the heads to remove (with ``prune_num_heads``); None: ``ratio``.

    Warns:
        UserWarning: a ``macs_reduction`` reached more than ``OVERSHOOT`` times further than asked.

    Raises:
        CompressError: bad ratio, patterns matching no layer, a model the tracer cannot follow, a
            layer that would lose every channel, or a forward that breaks after pruning.
    """
    where = "prune.channels"
    given = [k for k, v in (("ratio", ratio), ("macs_reduction", macs_reduction), ("latency", latency)) if v is not None]
    if len(given) != 1:
        if "latency" in given:
            raise CompressError(f"{where}.latency: cannot be combined with {given[0]}; the latency search chooses "
                                "the ratio")
        raise CompressError(f"{where}: give one of ratio, macs_reduction or latency")
    if round_to is not None and round_to < 1:
        raise CompressError(f"{where}.round_to: {round_to} must be >= 1")
    if head_pruning_ratio is not None:
        check_ratio(head_pruning_ratio, where, "head_pruning_ratio")
    target = latency_target(latency, f"{where}.latency") if latency is not None else None
    timed = api_engine(target, engine, where) if target is not None else None
    if round_to is None:
        round_to = DEFAULT_ROUND_TO if timed is None else engine_multiple(timed.backend, timed.int8 is not None)
    options = ChannelOptions(parse_enum(Importance, importance, f"{where}.importance"),
                             parse_enum(Scope, scope, f"{where}.scope"), round_to, tuple(include), tuple(exclude),
                             heads.HeadOptions(prune_num_heads, prune_head_dims, head_pruning_ratio))
    pruner = ChannelPruner(model, example_input, options, where=where)
    if target is not None and timed is not None:
        folder = Path(workdir) if workdir is not None else Path(tempfile.gettempdir())
        found = search_latency(pruner, target, timed, folder, round_to)
        pruner.prune(found.chosen.ratio)  # type: ignore[union-attr]  (a search times at least one candidate)
        pruner.finish()
        found.model = model
        return found
    if macs_reduction is not None:
        pruner.prune_to_macs(macs_reduction)
        achieved = pruner.macs_before / max(count_macs(model, pruner.example), 1)
        message = overshoot(macs_reduction, achieved, options.round_to, attention=has_attention(model))
        if message:
            warnings.warn(f"prune.channels: {message}", stacklevel=2)
    else:
        pruner.prune(float(ratio))  # type: ignore[arg-type]
    pruner.finish()
    return model


def has_attention(model: nn.Module) -> bool:
    """Whether ``model`` has attention heads (:func:`heads.head_layout`), whose channels move head-wise."""
    return any(heads.head_layout(m) is not None for m in model.modules())


def overshoot(requested: float, achieved: float, round_to: int, limit: float = OVERSHOOT, *,
              attention: bool = False) -> str | None:
    """What to say when a MACs target landed more than ``limit`` times further than ``requested``, else None.

    ``attention``: the model has attention heads, whose channels go a step per head.
    """
    if achieved <= requested * limit:
        return None
    if attention:
        return (f"macs_reduction: asked {requested:g}x, got {achieved:.2f}x (attention heads move "
                f"in steps of round_to: {round_to} channels per head); prune_num_heads: true"
                + (" or a smaller round_to" if round_to > 1 else "") + " gives finer steps")
    why = f"channels move in steps of round_to: {round_to} and whole coupled groups" if round_to > 1 \
        else "whole coupled groups of channels go at once"
    return (f"macs_reduction: asked {requested:g}x, got {achieved:.2f}x ({why}); scope: global"
            + (" or a smaller round_to" if round_to > 1 else "") + " gives finer steps")
