"""Channel permutation before 2:4 masking (the idea of NVIDIA ASP's permutation search, our own search).

A 2:4 mask keeps 2 of every 4 *consecutive* input channels, so which channels share a group of 4
decides how much weight magnitude survives. Reordering a layer's input channels does not change
what the network computes as long as the producers of those channels (conv filters, BatchNorm
entries, residual branches: the coupled group channel pruning also uses) are reordered the same way.

The search is a greedy channel swap: for the group's sparse consumers, ``Q[c, b]`` is the gain in
retained magnitude of ``c``'s group of 4 if ``c`` were replaced by ``b``; the best swap
``Q[a, b] + Q[b, a]`` is applied while it gains, updating only the two groups it touched. Every
accepted swap strictly raises the retained magnitude of the channel group's sparse layers together
(each layer's kept share of its own ``sum |w|``, summed), so a group never keeps less than without
permutation; one of its layers may lose a little where the others gain more. The search is
deterministic (every DDP process finds the same order) and makes at most as many swaps as there
are channels.

A sparse layer whose input channels no group maps one to one cannot be reordered: one that reads a
concatenation (DenseNet: every dense layer's 1x1 conv), channels flattened into several inputs
each, or the model's input. :class:`Permutations` names those layers and why, and says why nothing
was reordered when nothing was.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from compress.inputs import call_model
from compress.prune import graph
from compress.sparsity.pattern import M, retained, rows


@dataclass
class _Slice:
    """One tensor dimension whose entries follow the group's channels."""

    tensor: torch.Tensor
    dim: int
    positions: list[list[int]]  # per root channel, its indices along ``dim``


@dataclass
class PermutationResult:
    """What the search did to one coupled channel group."""

    root: str
    channels: int
    consumers: list[str]
    swaps: int = 0
    skipped: str | None = None
    layers: dict[str, dict[str, float]] = field(default_factory=dict)  # consumer -> retained before/after
    reorders: list[tuple[torch.Tensor, int, torch.Tensor]] = field(default_factory=list, repr=False)


class Permutations(list[PermutationResult]):
    """The per-group results, plus ``unpermuted``: each sparse layer no reordering reached, and why."""

    def __init__(self, results: list[PermutationResult], unpermuted: dict[str, str]) -> None:
        super().__init__(results)
        self.unpermuted = unpermuted

    @property
    def reason(self) -> str | None:
        """Why no channel was reordered at all, or None when some were."""
        if any(r.swaps for r in self):
            return None
        if not self:
            shown = "; ".join(f"{n}: {why}" for n, why in list(self.unpermuted.items())[:3])
            return f"no channel group feeds a 2:4 layer one to one ({shown})" if shown else "no 2:4 layer to reorder"
        skipped = sorted({r.skipped for r in self if r.skipped})
        if skipped:
            return "every group that feeds a 2:4 layer was left as it is: " + "; ".join(skipped[:3])
        return "no swap keeps more magnitude than the order the channels already have"


def search(mags: torch.Tensor, max_swaps: int | None = None) -> tuple[torch.Tensor, int]:
    """The column order of ``mags`` ([rows, C], C a multiple of 4) that keeps more 2:4 magnitude.

    Returns ``(order, swaps)``: position ``j`` takes column ``order[j]``.
    """
    a = mags.float()
    cols = a.shape[1]
    order = torch.arange(cols)
    if cols <= M:
        return order, 0
    group_of = torch.arange(cols) // M  # group_of[c]: the group of 4 column c sits in
    q = _gains(a, order, torch.arange(cols))
    tol = 1e-6 * float(a.sum())
    swaps, limit = 0, max_swaps if max_swaps is not None else cols
    while swaps < limit:
        gain = q + q.T
        gain[group_of[:, None] == group_of[None, :]] = float("-inf")
        best = int(torch.argmax(gain))
        x, y = divmod(best, cols)
        if float(gain[x, y]) <= tol:
            break
        px, py = int((order == x).nonzero()), int((order == y).nonzero())
        order[px], order[py] = y, x
        group_of[x], group_of[y] = group_of[y].clone(), group_of[x].clone()
        touched = order[torch.cat([torch.arange(px // M * M, px // M * M + M), torch.arange(py // M * M, py // M * M + M)])]
        q[touched] = _gains(a, order, touched)
        swaps += 1
    return order, swaps


def _gains(a: torch.Tensor, order: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``Q[c, b]`` for ``c`` in ``cols``: retained magnitude gained by c's group of 4 if b replaced c."""
    pos = torch.argsort(order)  # column -> position
    starts = pos[cols] // M * M
    members = order[starts[:, None] + torch.arange(M)]  # [k, 4]: each c's group
    others = members[members != cols[:, None]].reshape(len(cols), M - 1)  # [k, 3]
    three = torch.sort(a[:, others], dim=2, descending=True).values  # [rows, k, 3]
    t1, t2 = three[..., 0], three[..., 1]
    now = torch.sort(a[:, members], dim=2, descending=True).values[..., :2].sum((0, 2))  # [k]
    base = t1.sum(0) - now
    result = torch.empty(len(cols), a.shape[1])
    for j in range(len(cols)):  # one [rows, C] pass per column: faster than a [rows, k, C] broadcast
        # top-2 of {t1, t2, t3, x} = t1 + max(x, t2) for x = a[:, b]
        result[j] = torch.maximum(a, t2[:, j, None]).sum(0) + base[j]
    result[torch.arange(len(cols)), cols] = 0.0
    return result


def permute_groups(model: nn.Module, example: torch.Tensor, sparse: set[str], where: str) -> Permutations:
    """Permute the channels of every coupled group feeding a layer in ``sparse``, in place.

    Groups the permutation cannot follow (grouped convs, layers with parameters other than Conv/Linear/
    BatchNorm, or a forward whose output would change) are left as they are and reported skipped;
    sparse layers no group feeds one to one are named in the result's ``unpermuted``.

    Raises:
        CompressError: the dependency tracer cannot follow the model.
    """
    traced = graph.trace(model, example, where)
    names = {m: n for n, m in model.named_modules()}
    results = []
    partial: dict[str, str] = {}  # sparse layer -> why a group that feeds it cannot reorder it alone
    with torch.no_grad():
        was_training = model.training
        model.eval()
        try:
            reference = call_model(model, example)
            for g in graph.groups(traced.dg, model):
                result = _permute_group(model, g, names, sparse, traced.dg, partial)
                if result is None:
                    continue
                if result.swaps and not _same(call_model(model, example), reference):
                    result.skipped = "reordering the channels changes the model's output"
                    _undo(result)
                results.append(result)
        finally:
            model.train(was_training)
    for r in results:
        r.__dict__.pop("_undo", None)
    return Permutations(results, _unpermuted(results, sparse, partial))


def _unpermuted(results: list[PermutationResult], sparse: set[str], partial: dict[str, str]) -> dict[str, str]:
    """Each sparse layer whose input channels no group reordered, and why."""
    why: dict[str, str] = {}
    for r in results:
        for name in r.consumers:
            if r.skipped:
                why.setdefault(name, r.skipped)
            elif r.swaps:
                why[name] = ""
    found = {}
    for name in sorted(sparse):
        reason = why.get(name)
        if reason == "":
            continue
        if reason is None:
            reason = partial.get(name, "no channel group feeds it one to one (it reads the model's input, or "
                                       "channels made inside a module, e.g. attention's output)")
            if any(name in r.consumers for r in results):
                reason = "no swap keeps more magnitude than the channels' present order"
        found[name] = reason
    return found


def _permute_group(model: nn.Module, g: graph.Group, names: dict[nn.Module, str], sparse: set[str],
                   dg: Any, partial: dict[str, str]) -> PermutationResult | None:
    slices, consumers, why = _slices(g, names, sparse, dg, partial)
    if not consumers:
        return None  # no sparse layer reads these channels: nothing to gain
    result = PermutationResult(g.root, g.channels, consumers)
    weights = {name: model.get_submodule(name).weight for name in consumers}
    for name, w in weights.items():
        result.layers[name] = {"before": round(retained(w), 6)}
    if why is not None:
        result.skipped = why
        for entry in result.layers.values():
            entry["after"] = entry["before"]
        return result
    mags = torch.cat([rows(w).abs().float() / max(float(w.abs().sum()), 1e-12) for w in weights.values()])
    order, result.swaps = search(mags.cpu())
    saved = [(s.tensor, s.tensor.detach().clone()) for s in slices]
    for s in slices:
        index = _index(s, order, s.tensor.device)
        s.tensor.copy_(s.tensor.index_select(s.dim, index))
        result.reorders.append((s.tensor, s.dim, index))
    result.__dict__["_undo"] = saved
    for name, w in weights.items():
        result.layers[name]["after"] = round(retained(w), 6)
    return result


def _undo(result: PermutationResult) -> None:
    for tensor, old in result.__dict__.get("_undo", []):
        tensor.copy_(old)
    for entry in result.layers.values():
        entry["after"] = entry["before"]
    result.swaps = 0
    result.reorders = []


def _index(s: _Slice, order: torch.Tensor, device: torch.device) -> torch.Tensor:
    index = torch.arange(s.tensor.shape[s.dim])
    for j, src in enumerate(order.tolist()):
        index[s.positions[j]] = torch.tensor(s.positions[src])
    return index.to(device)


def _slices(g: graph.Group, names: dict[nn.Module, str], sparse: set[str], dg: Any,
            partial: dict[str, str]) -> tuple[list[_Slice], list[str], str | None]:
    """The tensor slices that follow group ``g``'s channels, its sparse consumers, and why it cannot be permuted.

    Sparse layers reading these channels among others (a concatenation) or flattened land in ``partial``.
    """
    slices: list[_Slice] = []
    consumers: list[str] = []
    why = None
    for item in g.tp_group.items:
        module = item.dep.target.module
        name = names.get(module)
        if name is None:
            continue  # an op without parameters (add, relu, flatten): nothing to reorder
        positions = _positions(item.idxs, item.root_idxs, g.channels)
        out = dg.is_out_channel_pruning_fn(item.dep.handler)
        if positions is None:
            why = why or f"'{name}' does not map the channels one to one"
            continue
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            slices += [_Slice(t, 0, positions) for t in (module.weight, module.bias, module.running_mean,
                                                         module.running_var) if isinstance(t, torch.Tensor)]
        elif isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
            if isinstance(module, nn.modules.conv._ConvNd) and module.groups != 1:
                why = why or f"grouped conv '{name}'"
                continue
            transposed = isinstance(module, nn.modules.conv._ConvTransposeNd)
            dim = (1 if transposed else 0) if out else (0 if transposed else 1)
            slices.append(_Slice(module.weight, dim, positions))
            if out and module.bias is not None:
                slices.append(_Slice(module.bias, 0, positions))
            if not out and name in sparse and name not in consumers and not transposed:
                cin = module.weight.shape[1]
                if any(len(p) != 1 for p in positions):
                    partial[name] = f"it reads the channels of '{g.root}' flattened, several inputs each"
                elif cin != g.channels:
                    partial[name] = (f"it reads a concatenation: {g.channels} of its {cin} input channels come "
                                     f"from '{g.root}', the rest from other layers")
                else:
                    consumers.append(name)
        elif any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False)):
            why = why or f"{type(module).__name__} '{name}' would need reordering too"
    return slices, consumers, why


def _positions(idxs: list[int], root_idxs: list[int] | None, channels: int) -> list[list[int]] | None:
    """Per root channel, its indices in this tensor (several after a flatten), or None if not a clean map."""
    if root_idxs is None or len(root_idxs) != len(idxs):
        return None
    found: list[list[int]] = [[] for _ in range(channels)]
    for idx, root in zip(idxs, root_idxs, strict=True):
        if root is None or not 0 <= root < channels:
            return None
        found[root].append(int(idx))
    sizes = {len(p) for p in found}
    return found if len(sizes) == 1 and 0 not in sizes else None


def _same(out: Any, reference: Any) -> bool:
    """Whether the permuted model's outputs (tensors, or tuples/lists/dicts of them) equal the reference's.

    Outputs with no tensor to compare count as different: a permutation that cannot be checked is not kept.
    """
    a, b = _tensors(out), _tensors(reference)
    if not b or len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        rtol = 1e-4 if y.dtype in (torch.float32, torch.float64) else 1e-2  # half precision reorders sums too
        scale = float(y.abs().max()) if y.numel() else 0.0
        if x.shape != y.shape or not torch.allclose(x.float(), y.float(), rtol=rtol, atol=rtol * 0.1 * scale + 1e-6):
            return False
    return True


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    values = out.values() if isinstance(out, dict) else out if isinstance(out, (tuple, list)) else []
    return [t for v in values for t in _tensors(v)]
