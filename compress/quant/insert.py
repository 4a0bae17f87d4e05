"""``prepare``: put quantizers into a model by module replacement (and fx for adds/concat/pooling)."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch
from pydantic import Field
from torch import fx, nn

from compress import structure
from compress.errors import CompressError, DataError, first_line, parse_enum
from compress.quant import attention, graph, sdpa
from compress.quant.layers import QUANT_LAYERS, QuantLayer, range_is_current
from compress.quant.quantizer import TensorQuantizer
from compress.quant.spec import Target, activation_spec
from compress.select import matches, select_names

_TARGET_ATTR = "_compress_quant_target"
_PRESERVED = structure.PRESERVED


class Attention(str, Enum):
    """What happens to ``nn.MultiheadAttention`` (see :mod:`compress.quant.attention`)."""

    int8 = "int8"  # split projections quantized, and both attention MatMuls (Q/DQ on all four inputs)
    float = "float"  # split projections quantized, attention MatMuls in float (ModelOpt's disable_mha_qdq)
    fused = "fused"  # left as it is: nothing in it quantized (checkpoints made before the rewrite existed)


@dataclass(frozen=True)
class QuantConfig:
    """Where quantizers go.

    Attributes:
        target: deployment engine (placement and activation type).
        include: layer-name patterns (fnmatch) to quantize; empty means every Conv/ConvTranspose2d/Linear.
        exclude: patterns left in float (also matches graph quantizers ``act_quant.<node>_...``).
        graph: also quantize residual adds/concat/pooling via ``torch.fx`` when the model traces.
        attention: INT8 attention, float attention MatMuls, or ``nn.MultiheadAttention`` left fused.
        sites: the modules whose ``F.scaled_dot_product_attention`` calls get quantizers, in a model that does
            not trace (found on an example input by :func:`prepare`; recorded so a checkpoint rebuilds them).
    """

    target: Target = Target.tensorrt
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    graph: bool = True
    attention: Attention = Attention.int8
    sites: tuple[str, ...] | None = None

    def to_payload(self) -> dict[str, Any]:
        out = {"target": self.target.value, "include": list(self.include), "exclude": list(self.exclude),
               "graph": self.graph, "attention": self.attention.value}
        return out if self.sites is None else {**out, "sites": list(self.sites)}


class Skip(str, Enum):
    """Why a quantizable layer was left in float."""

    excluded = "excluded"  # matches an exclude pattern
    not_included = "not_included"  # include patterns were given and none matches
    never_called = "never_called"  # absent from the fx trace: forward never calls it as a module
    unsupported = "unsupported"  # inside an attention module the rewrite does not support


@dataclass
class Plan:
    """What :func:`prepare` did: quantized layers, graph quantizers, why fx was not used (if not), and
    the quantizable layers left in float with ``(reason, detail)``."""

    layers: list[str] = field(default_factory=list)
    graph_quantizers: list[str] = field(default_factory=list)
    graph_skipped: str | None = None
    skipped: dict[str, tuple[Skip, str]] = field(default_factory=dict)
    attention: list[str] = field(default_factory=list)  # nn.MultiheadAttention modules rewritten
    sdpa: list[str] = field(default_factory=list)  # modules whose F.scaled_dot_product_attention calls are written out
    sdpa_skipped: str | None = None  # why SDPA calls were not searched (untraced model, no example input)
    kept_float: dict[str, int] = field(default_factory=dict)  # op kind -> count, float by design (see _KEPT_FLOAT)


# Ops that stay float in both engines' INT8 paths (no INT8 kernel; quantizing them would only add Q/DQ).
_KEPT_FLOAT: dict[str, tuple[type[nn.Module], ...]] = {
    "LayerNorm": (nn.LayerNorm,), "GroupNorm": (nn.GroupNorm,), "GELU": (nn.GELU,), "Softmax": (nn.Softmax,),
}


def _kept_float(model: nn.Module, attention_modules: int) -> dict[str, int]:
    counts = {kind: sum(isinstance(m, types) for m in model.modules()) for kind, types in _KEPT_FLOAT.items()}
    counts["Softmax"] += attention_modules  # each rewritten attention's (or SDPA call's) softmax
    return {kind: n for kind, n in counts.items() if n}


def to_target(value: Target | str) -> Target:
    """Convert a target name once, at the edge.

    Raises:
        CompressError: unknown target (the choices and the closest one named).
    """
    return parse_enum(Target, value, what="quantization target")


def quantizable_layers(model: nn.Module) -> list[str]:
    """Names of the layers :func:`prepare` can quantize (exact Conv1d/2d/3d, ConvTranspose2d, Linear), and the
    ``q_proj``/``k_proj``/``v_proj``/``out_proj`` layers each ``nn.MultiheadAttention`` is split into."""
    names = []
    for name, m in model.named_modules():
        if type(m) in QUANT_LAYERS and name:
            names.append(name)
        elif type(m) is nn.MultiheadAttention:
            names.extend(f"{name}.{p}" if name else p for p in attention.PROJECTIONS)
    return names


def select_layers(model: nn.Module, include: Sequence[str], exclude: Sequence[str], where: str = "") -> list[str]:
    """The quantizable layers matching ``include`` (all when empty) and not ``exclude``.

    Raises:
        CompressError: a pattern matches nothing, or nothing is left to quantize.
    """
    return select_names(quantizable_layers(model), include, exclude, where=where or "quantize",
                        what="quantizable layer (Conv/ConvTranspose2d/Linear)",
                        deferred=lambda p: p.startswith(graph.CONTAINER + "."))


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def prepare(
    model: nn.Module,
    target: Target | str = Target.tensorrt,
    *,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    graph_quantizers: bool = True,
    attention: Attention | str = Attention.int8,
    example_input: torch.Tensor | None = None,
    where: str = "",
) -> nn.Module:
    """Insert fake quantizers for ``target``; returns the quantized model (calibrate it next).

    Conv/ConvTranspose2d/Linear layers are replaced by their ``Quant*`` subclasses (weights shared,
    nothing copied). When the model traces with ``torch.fx``, the result is an ``fx.GraphModule``
    with the same submodule names that also quantizes residual adds (and, for ONNX Runtime,
    concat and pooling); otherwise only the layers are quantized (see :func:`plan_of`).

    Args:
        model: a float model (not already quantized); its modules are left as they are, its parameters and
            buffers are shared with the result (an optimizer made before still trains it).
        target: ``tensorrt`` or ``onnxruntime`` (see :class:`compress.quant.Target`).
        include/exclude: layer-name patterns, e.g. ``["layer*"]``, ``["fc", "conv1"]``.
        attention: ``int8`` splits each ``nn.MultiheadAttention`` into quantized projections and quantizes
            both attention MatMuls' inputs; ``float`` keeps those MatMuls float; ``fused`` leaves it alone.
            The same goes for ``F.scaled_dot_product_attention`` calls (see :mod:`compress.quant.sdpa`).
        example_input: one batch the model runs on; needed to find SDPA calls in a model ``torch.fx`` cannot
            trace (without it they stay fused, and the plan says so).

    Raises:
        CompressError: unknown target, a pattern that matches no layer, an already quantized model.
    """
    config = QuantConfig(to_target(target), tuple(include), tuple(exclude), graph_quantizers,
                         parse_enum(Attention, attention, what="attention mode"))
    return _apply(model, config, where, example_input)


def _apply(model: nn.Module, config: QuantConfig, where: str = "", example_input: torch.Tensor | None = None) -> nn.Module:
    if is_quantized(model):
        raise CompressError(f"{where or 'quantize'}: the model is already quantized")
    chosen = select_layers(model, config.include, config.exclude, where)
    origin = structure.origin_of(model)
    plan = Plan()
    work = model
    if config.graph:
        was_training = model.training
        model.eval()  # trace the inference graph: no training-only branches (dropout, stochastic depth)
        try:
            work = graph.trace(model)
            work.train(was_training)
        except Exception as exc:  # fx raises many types for untraceable Python
            plan.graph_skipped = f"torch.fx cannot trace the model: {first_line(exc)}"
            work = model
        finally:
            model.train(was_training)
    traced = isinstance(work, fx.GraphModule) and work is not model
    sites = None if traced else _untraced_sites(model, config, example_input, plan, where)
    if not traced:  # the user's float model keeps its modules; tensors shared, as in a traced model
        shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
        work = copy.deepcopy(model, shared)
    plan.skipped = _unselected(model, chosen, config)
    in_attention = _rewrite_attention(work, chosen, config, plan)
    sites = _quantize_sdpa(work, chosen, config, plan, sites, where)
    if traced:  # the trace holds only modules forward reaches; a layer it never calls stays as it is
        plan.skipped.update((n, (Skip.never_called, _why_not_called(work, n))) for n in chosen
                            if not _called(work, n))
        chosen = [n for n in chosen if _called(work, n)]
    # ONNX Runtime: quantize each tensor once at its producer (graph pass), not per consumer layer.
    layer_input = None if traced and config.target is Target.onnxruntime else activation_spec(config.target)
    for name in chosen:
        layer = work.get_submodule(name)
        # inside a rewritten attention (an fx leaf) no graph quantizer reaches a projection's input
        spec = activation_spec(config.target) if name in in_attention else layer_input
        _set_module(work, name, QUANT_LAYERS[type(layer)].from_float(layer, spec, name))
    plan.layers = chosen
    plan.kept_float = _kept_float(model, len(plan.attention) + len(plan.sdpa))  # modules fx inlined counted too
    offered: list[str] = []  # every graph quantizer the target would place, before include/exclude
    if traced:
        assert isinstance(work, fx.GraphModule)
        keeper = _keeper(config)

        def keep(name: str) -> bool:
            offered.append(name)
            return keeper(name)

        plan.graph_quantizers = graph.place(work, config.target, activation_spec(config.target), keep)
    _check_graph_patterns(config, offered if traced else None, where)
    settings = {_TARGET_ATTR: config.target, "_compress_quant_plan": plan, "_compress_quant_attention": config.attention}
    work.__dict__.update(settings)
    if isinstance(work, fx.GraphModule):  # copy.deepcopy rebuilds a GraphModule from its graph: keep them across it
        work.meta.setdefault(_PRESERVED, {}).update(settings)
    if origin is None:  # a model compress did not build: recorded all the same, so compress.save can rebuild it
        structure.set_origin(work, structure.Origin(factory=""))
    elif traced:  # a new model: its record must not leak into the float model's origin
        structure.set_origin(work, copy.deepcopy(origin))
    structure.record(work, "quant", QuantConfig(**{**config.__dict__, "sites": sites}).to_payload())
    structure.enforce(work)  # layers the rewrite made (split attention projections) keep e.g. their 2:4 masks
    return work


def _rewrite_attention(work: nn.Module, chosen: list[str], config: QuantConfig, plan: Plan) -> set[str]:
    """Split each ``nn.MultiheadAttention`` with a chosen projection (:mod:`compress.quant.attention`);
    unsupported ones stay fused, their projections listed as skipped. Returns the chosen projections inside."""
    mhas = {n: m for n, m in work.named_modules() if type(m) is nn.MultiheadAttention}
    def projections(name: str) -> list[str]:
        return [f"{name}.{p}" if name else p for p in attention.PROJECTIONS]

    if config.attention is Attention.fused:
        skip = set(mhas)
        reason = "attention: fused keeps nn.MultiheadAttention as it is"
        plan.skipped.update((p, (Skip.excluded, reason)) for n in mhas for p in projections(n) if p in chosen)
    else:
        skip = {n for n in mhas if not any(p in chosen for p in projections(n))}
    done, kept = attention.rewrite(work, activation_spec(config.target), matmuls=config.attention is Attention.int8,
                                   skip=skip)
    for name, reason in kept.items():
        plan.skipped.update((p, (Skip.unsupported, reason)) for p in projections(name) if p in chosen)
    plan.attention = done
    inside = {p for n in done for p in projections(n)}
    chosen[:] = [n for n in chosen if n not in plan.skipped]
    return inside


def _untraced_sites(model: nn.Module, config: QuantConfig, example_input: torch.Tensor | None, plan: Plan,
                    where: str) -> tuple[str, ...] | None:
    """The modules calling SDPA in a model that does not trace: recorded ones (a rebuild), else found on the
    example input; None where attention is fused or there is no example input."""
    if config.attention is Attention.fused:
        return None
    if config.sites is not None:
        return config.sites
    if example_input is None:
        plan.sdpa_skipped = "no example input: F.scaled_dot_product_attention calls not searched (they stay fused)"
        return None
    try:
        return tuple(sdpa.find_sites(model, example_input))
    except Exception as exc:  # the user's model raises what it raises
        raise CompressError(f"{where or 'quantize'}: the model fails on the example input: {first_line(exc)}") from None


def _quantize_sdpa(work: nn.Module, chosen: list[str], config: QuantConfig, plan: Plan, sites: tuple[str, ...] | None,
                   where: str) -> tuple[str, ...] | None:
    """Quantizers on both MatMuls of each SDPA call whose site holds a chosen layer (``int8``); ``float`` only
    lists them. Returns the untraced sites (what a checkpoint records), or None."""
    def wanted(site: str) -> bool:
        return any(n.startswith(f"{site}.") or not site for n in chosen)

    if config.attention is Attention.fused:
        return None
    spec = activation_spec(config.target) if config.attention is Attention.int8 else None
    if isinstance(work, fx.GraphModule):
        plan.sdpa = sdpa.replace_calls(work, spec, wanted)
        return None
    if sites is None:
        return None
    picked = list(sites) if config.sites is not None else [s for s in sites if wanted(s)]  # a rebuild: as recorded
    plan.sdpa = picked
    if spec is None:  # float: listed (and recorded, so a rebuild lists them too), nothing routed
        return tuple(picked)
    try:
        sdpa.route_sites(work, picked, spec)
    except ValueError as exc:
        raise CompressError(f"{where or 'quantize'}: {exc}") from None
    return tuple(picked)


def _unselected(model: nn.Module, chosen: list[str], config: QuantConfig) -> dict[str, tuple[Skip, str]]:
    """The quantizable layers include/exclude left out, each with the pattern that decided it."""
    wanted = [p for p in config.include if not p.startswith(graph.CONTAINER + ".")]
    out: dict[str, tuple[Skip, str]] = {}
    for name in quantizable_layers(model):
        if name in chosen:
            continue
        if wanted and not matches(name, wanted):
            out[name] = (Skip.not_included, f"matches no include pattern ({', '.join(wanted)})")
        else:
            pattern = next((p for p in config.exclude if matches(name, [p])), "?")
            out[name] = (Skip.excluded, f"matches exclude pattern '{pattern}'")
    return out


def _has_module(root: nn.Module, name: str) -> bool:
    try:
        root.get_submodule(name)
    except AttributeError:
        return False
    return True


def _called(traced: fx.GraphModule, name: str) -> bool:
    """Whether the fx trace calls layer ``name`` as a module. A layer whose forward reads only its weight (e.g.
    torchvision Swin's ``F.linear(x, self.qkv.weight)``) survives in the trace as a bare ``nn.Module`` holding it
    (fx's placeholder for attributes it copied)."""
    return _has_module(traced, name) and type(traced.get_submodule(name)) is not nn.Module


def _why_not_called(traced: fx.GraphModule, name: str) -> str:
    if _has_module(traced, name):
        return "forward reads its weight directly (e.g. F.linear(x, layer.weight)), never calling it: left float"
    return "forward never calls it as a module (not in the torch.fx trace)"


def _check_graph_patterns(config: QuantConfig, placed: list[str] | None, where: str) -> None:
    """``act_quant.*`` patterns must match a graph quantizer the target would place.

    Raises:
        CompressError: such a pattern matches none (or the model did not trace).
    """
    prefix = f"{where}." if where else ""
    for key, patterns in (("include", config.include), ("exclude", config.exclude)):
        for pattern in patterns:
            if not pattern.startswith(graph.CONTAINER + "."):
                continue
            if placed is None:
                raise CompressError(f"{prefix}{key}: pattern '{pattern}' names graph quantizers, but torch.fx cannot trace the model")
            candidates = placed
            if not any(matches(n, [pattern]) for n in candidates):
                shown = ", ".join(candidates[:8]) + (f", ... ({len(candidates)} in all)" if len(candidates) > 8 else "")
                raise CompressError(f"{prefix}{key}: pattern '{pattern}' matches no graph quantizer (graph quantizers: {shown or 'none'})")


def _keeper(config: QuantConfig):  # noqa: ANN202
    graph_include = [p for p in config.include if p.startswith(graph.CONTAINER + ".")]

    def keep(name: str) -> bool:
        if graph_include and not matches(name, graph_include):
            return False
        return not matches(name, config.exclude)

    return keep


class QuantRecord(structure.Payload):
    """The ``quant`` payload (:meth:`QuantConfig.to_payload`), typed for checkpoints from anywhere."""

    target: Target = Field(strict=False)  # the enum's value, as to_payload writes it
    include: list[str] = []
    exclude: list[str] = []
    graph: bool = True
    attention: Attention = Field(Attention.fused, strict=False)  # absent: written before attention was rewritten
    sites: list[str] | None = None  # untraced models' SDPA sites given quantizers


@structure.register_rebuild("quant", QuantRecord)
def _rebuild(model: nn.Module, payload: QuantRecord) -> nn.Module:
    sites = tuple(payload.sites) if payload.sites is not None else None
    config = QuantConfig(payload.target, tuple(payload.include), tuple(payload.exclude), payload.graph, payload.attention,
                         sites)
    return _apply(model, config)


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, TensorQuantizer) for m in model.modules())


def target_of(model: nn.Module) -> Target | None:
    """The target a quantized model was prepared for (``None`` for a float model)."""
    return model.__dict__.get(_TARGET_ATTR) if is_quantized(model) else None


def attention_mode(model: nn.Module) -> Attention:
    """How a prepared model's ``nn.MultiheadAttention`` modules were quantized."""
    return model.__dict__.get("_compress_quant_attention", Attention.fused)


def plan_of(model: nn.Module) -> Plan:
    return model.__dict__.get("_compress_quant_plan") or Plan()


def quantizers(model: nn.Module) -> Iterator[tuple[str, TensorQuantizer]]:
    for name, m in model.named_modules():
        if isinstance(m, TensorQuantizer):
            yield name, m


def quant_layers(model: nn.Module) -> Iterator[tuple[str, QuantLayer]]:
    for name, m in model.named_modules():
        if isinstance(m, QuantLayer):
            yield name, m


def uncalibrated(model: nn.Module) -> list[str]:
    """Enabled quantizers whose amax was never set."""
    return [n for n, q in quantizers(model) if q.quant_enabled and not q.calibrated]


@torch.no_grad()
def refresh_weight_amax(model: nn.Module) -> None:
    """Per-output-channel max of |weight| into every weight quantizer, now (each layer also does it itself at its
    next forward once its weight changed: see :mod:`compress.quant.layers`).

    Raises:
        DataError: a weight holds NaN or Inf.
    """
    for name, layer in quant_layers(model):
        q = layer.weight_quantizer
        w = layer.weight.detach()
        dims = [d for d in range(w.ndim) if d != q.spec.axis]
        amax = w.abs().amax(dim=dims)
        if not bool(torch.isfinite(amax).all()):
            raise DataError(f"{name}.weight contains NaN or Inf (did training diverge? try a lower lr)")
        q.set_amax(amax)
        range_is_current(layer)
