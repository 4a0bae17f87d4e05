"""INT8 attention for models that call ``F.scaled_dot_product_attention`` themselves (timm, Hugging Face, ...).

Their Q/K/V and output projections are ``nn.Linear`` already (quantized like any layer); the two attention
MatMuls are inside the fused SDPA call, where no quantizer reaches. Each such call becomes
:func:`compress.attention.attention` (MatMul/Softmax, the scale on the Q side) with a quantizer on each input of
both MatMuls, held by an :class:`AttentionQuantizers` child (``sdpa_quant``) of the *site*: the module whose
own forward calls SDPA.

- A model that traces with ``torch.fx`` (timm): each ``call_function`` node of SDPA becomes a ``call_module``
  of the site's ``sdpa_quant`` (:func:`replace_calls`).
- One that does not (Hugging Face): the sites are found by running the model once on an example input
  (:func:`find_sites`), and each site's forward runs with SDPA routed through its quantizers
  (:class:`RoutedForward`, set on the instance only). All SDPA calls of one site share its quantizers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import fx, nn

from compress.attention import AttentionPoints, attention, explicit_attention
from compress.inputs import call_model, move_inputs, normalize
from compress.quant import graph
from compress.quant.attention import MATMUL_QUANTIZERS
from compress.quant.quantizer import TensorQuantizer
from compress.quant.spec import QuantSpec

CHILD = "sdpa_quant"
_SDPA = (F.scaled_dot_product_attention, graph.late_sdpa)  # the builtin fx records, and what graph.trace calls


def child_name(site: str, suffix: str = "") -> str:
    return f"{site}.{CHILD}{suffix}" if site else f"{CHILD}{suffix}"


class AttentionQuantizers(nn.Module):
    """The four quantizers of one attention (Q after the scale, Kᵀ, softmax output, V); called like
    ``F.scaled_dot_product_attention`` it computes :func:`compress.attention.attention` through them."""

    def __init__(self, spec: QuantSpec, name: str) -> None:
        super().__init__()
        for q in MATMUL_QUANTIZERS:
            setattr(self, q, TensorQuantizer(spec, name=f"{name}.{q}"))

    def points(self) -> AttentionPoints:
        return AttentionPoints(self.q_quantizer, self.k_quantizer, self.probs_quantizer, self.v_quantizer)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
                dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                enable_gqa: bool = False) -> torch.Tensor:
        return attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, points=self.points(),
                         training=self.training)


def replace_calls(gm: fx.GraphModule, spec: QuantSpec | None, wanted: Callable[[str], bool]) -> list[str]:
    """Route each SDPA call of a traced model whose site is ``wanted`` through a new ``sdpa_quant`` of that site
    (with ``spec`` None, nothing is changed: the sites are only listed).

    Returns:
        The sites (module names, in graph order; a site calling SDPA twice is listed twice).
    """
    sites: list[str] = []
    taken: set[str] = set()
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _SDPA:
            continue
        stack = node.meta.get("nn_module_stack") or {}
        site = next(reversed(stack)) if stack else ""
        if not wanted(site):
            continue
        sites.append(site)
        if spec is None:
            continue
        name, k = child_name(site), 0
        while name in taken:
            k += 1
            name = child_name(site, f"_{k}")
        taken.add(name)
        gm.add_submodule(name, AttentionQuantizers(spec, name))
        with gm.graph.inserting_before(node):
            call = gm.graph.call_module(name, node.args, node.kwargs)
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
    if spec is not None and sites:
        gm.graph.lint()
        gm.recompile()
    return sites


@contextmanager
def _recording(model: nn.Module, found: dict[str, None]) -> Iterator[None]:
    """While active, each SDPA call adds the innermost module running (its name) to ``found``."""
    names = {id(m): n for n, m in model.named_modules()}
    stack: list[str] = []
    handles = []
    def enter(module: nn.Module, _args: Any) -> None:
        stack.append(names[id(module)])

    def leave(_module: nn.Module, _args: Any, _out: Any) -> None:  # a hook's return value would replace the output
        stack.pop()

    for module in model.modules():
        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave, always_call=True)]
    saved = F.scaled_dot_product_attention

    def record(*args: Any, **kwargs: Any) -> torch.Tensor:
        if stack:
            found[stack[-1]] = None
        return saved(*args, **kwargs)

    F.scaled_dot_product_attention = record
    try:
        yield
    finally:
        F.scaled_dot_product_attention = saved
        for handle in handles:
            handle.remove()


@torch.no_grad()
def find_sites(model: nn.Module, example_input: Any) -> list[str]:
    """Names of the modules whose own forward calls ``F.scaled_dot_product_attention`` on ``example_input``
    (a tensor, a tuple of positional inputs or a dict of keyword inputs; run once, in eval mode).
    ``nn.MultiheadAttention``, rewritten separately, is left out.

    Raises:
        Exception: whatever the model raises on ``example_input``.
    """
    found: dict[str, None] = {}
    device = next(model.parameters(), torch.empty(0)).device
    was_training = model.training
    model.eval()
    try:
        with _recording(model, found):
            call_model(model, move_inputs(normalize(example_input), device))
    finally:
        model.train(was_training)
    return [n for n in found if type(model.get_submodule(n)) is not nn.MultiheadAttention]


class RoutedForward:
    """A site's ``forward``: its class's forward with SDPA routed through the site's ``sdpa_quant``.

    Set on the instance only (the class and its other instances stay as they are); ``copy.deepcopy`` copies
    the site it refers to, and the state_dict gains only the quantizers' buffers."""

    def __init__(self, site: nn.Module) -> None:
        self.site = site

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        site = self.site
        with explicit_attention(getattr(site, CHILD).points(), training=site.training):
            return type(site).forward(site, *args, **kwargs)


def route_sites(model: nn.Module, sites: list[str], spec: QuantSpec) -> None:
    """Give each site (in place) an ``sdpa_quant`` child and a :class:`RoutedForward`.

    Raises:
        ValueError: a site is not in the model, or already has its own instance-level forward.
    """
    for name in sites:
        try:
            site = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"attention site '{name}' is not in the model") from None
        if "forward" in site.__dict__:
            raise ValueError(f"attention site '{name}' already has an instance-level forward (a hook library?)")
        site.add_module(CHILD, AttentionQuantizers(spec, child_name(name)))
        site.forward = RoutedForward(site)
