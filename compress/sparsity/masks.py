"""2:4 masks that stay with the model: recorded in its origin, enforced by the model's own layers.

The masks live in the model's structure record (one uint8 code per group of 4 weights), so they
follow the model through deep copies, quantizer insertion and compress checkpoints. Each sparse layer
carries a forward pre-hook that keeps its mask (:mod:`compress.sparsity.enforce`), so any optimizer and
any training loop keep the 2:4 pattern; ``compress.save`` and ``compress.load`` both refuse weights that
break it (:func:`check_weights`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from compress import structure
from compress.callbacks import Callback, TrainState
from compress.errors import CheckpointError, CompressError
from compress.inputs import move_inputs
from compress.sparsity import eligible, enforce, targets
from compress.sparsity.pattern import PATTERN, decode, encode, mask_2to4, retained

KIND = "sparsity"


def is_sparse(model: nn.Module) -> bool:
    """Whether ``model`` carries 2:4 masks (from :func:`apply_2to4`, the sparsity stage or its checkpoint)."""
    return structure.has(model, KIND)


def sparse_layers(model: nn.Module) -> list[str]:
    """The layer names ``model``'s 2:4 masks cover, as the model names them now (an attention's packed
    ``in_proj_weight`` becomes its ``q_proj``/``k_proj``/``v_proj`` once the INT8 rewrite split it)."""
    origin = structure.origin_of(model)
    entries = [e for e in origin.structure if e.get("kind") == KIND] if origin else []
    return [layer for e in entries for name in e["payload"]["layers"] for layer in targets.layer_names(model, name)]


class SparseMasks:
    """The keep-masks of a model's sparse layers, bound to their weight tensors (keyed by the layer names the
    model has now: an attention's packed q/k/v weight, or its three split projections, see ``targets``).

    Raises:
        CompressError: a recorded layer is gone or its weight changed shape (e.g. pruned after sparsity).
    """

    def __init__(self, model: nn.Module) -> None:
        self.weights: dict[str, torch.Tensor] = {}
        self.masks: dict[str, torch.Tensor] = {}
        self.bindings: dict[str, targets.Binding] = {}
        origin = structure.origin_of(model)
        for entry in origin.structure if origin else []:
            if entry.get("kind") != KIND:
                continue
            for name, codes in entry["payload"]["layers"].items():
                bindings = targets.bind(model, name)
                like = torch.empty(targets.full_shape(bindings), device=bindings[0].weight.device)
                try:
                    mask = decode(codes, like)
                except ValueError as exc:
                    raise CompressError(f"sparsity: the 2:4 mask of layer '{name}' no longer fits it ({exc}); "
                                        "was the model pruned or resized after sparsity?") from None
                for b in bindings:
                    self.masks[b.name], self.weights[b.name], self.bindings[b.name] = mask[b.rows], b.weight, b

    def __bool__(self) -> bool:
        return bool(self.masks)

    @torch.no_grad()
    def apply(self) -> None:
        """Zero the masked weights again (after an optimizer step moved them)."""
        for name, weight in self.weights.items():
            mask = self.masks[name]
            if mask.device != weight.device:
                self.masks[name] = mask = mask.to(weight.device)
            weight.mul_(mask)


def _weight(model: nn.Module, name: str) -> torch.Tensor:
    """The one weight a mask entry covers in a model not yet rewritten (a layer's, or a packed q/k/v weight)."""
    return targets.bind(model, name)[0].weight


def record(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Store ``masks`` (keep-masks per layer name) in the model's origin, for later stages and checkpoints."""
    structure.record(model, KIND, {"pattern": PATTERN, "layers": {n: encode(m) for n, m in masks.items()}})


class MaskRecord(structure.Payload):
    """The ``sparsity`` payload: the pattern and, per layer name, its uint8 mask codes."""

    pattern: Literal["2:4"]
    layers: dict[str, torch.Tensor]


@structure.register_rebuild(KIND, MaskRecord)
def _rebuild(model: nn.Module, payload: MaskRecord) -> nn.Module:
    for name, codes in payload.layers.items():
        owner = name.rpartition(".")[0] if targets.is_packed(name) else name
        try:
            module = model.get_submodule(owner)
        except AttributeError:
            raise ValueError(f"layers.{name}: the 2:4 masks name layer '{owner}', which the factory model lacks") from None
        packed = targets.is_packed(name) and isinstance(module, nn.MultiheadAttention) and \
            isinstance(module.in_proj_weight, torch.Tensor)
        if not isinstance(module, eligible.SPARSE_TYPES) and not packed:
            raise ValueError(f"layers.{name}: '{owner}' is a {type(module).__name__}; 2:4 masks are kept for "
                             "Conv and Linear layers and MultiheadAttention's in_proj_weight only")
        try:
            decode(codes, module.in_proj_weight if packed else module.weight)
        except ValueError as exc:
            raise ValueError(f"layers.{name}: the 2:4 mask of layer '{name}' does not fit the model the factory "
                             f"builds ({exc})") from None
    return model


@structure.register_enforce(KIND)
def keep_masks(model: nn.Module) -> None:
    """Put a mask-keeping forward pre-hook on every sparse layer of ``model`` (see :mod:`compress.sparsity.enforce`).

    Raises:
        CompressError: a recorded layer is gone or its weight changed shape.
    """
    masks = SparseMasks(model)
    enforce.install(model, {name: (masks.bindings[name], mask) for name, mask in masks.masks.items()})


@structure.register_verify(KIND)
@torch.no_grad()
def check_weights(model: nn.Module, source: str) -> None:
    """Before saving and after loading a checkpoint: every weight its masks zero must be zero.

    Raises:
        CheckpointError: the weights and masks disagree (weights written past the model's mask hooks, e.g.
            through ``.data``, or a checkpoint edited or written by other code).
    """
    try:
        masks = SparseMasks(model)
    except CompressError as exc:  # a mask that no longer fits its layer
        raise CheckpointError(f"checkpoint {source}: {exc}") from None
    for name, weight in masks.weights.items():
        if bool((weight[~masks.masks[name].to(weight.device)] != 0).any()):
            raise CheckpointError(f"checkpoint {source}: layer '{name}' has nonzero weights where its 2:4 mask is "
                                  "zero: the weights and the masks disagree")


class _MaskCallback(Callback):
    def __init__(self, masks: SparseMasks) -> None:
        self.masks = masks

    def on_train_start(self, state: TrainState) -> None:
        self.masks.apply()

    def after_step(self, state: TrainState) -> None:
        self.masks.apply()


def mask_callback(model: nn.Module) -> Callback | None:
    """A fine-tune callback keeping ``model``'s 2:4 masks after every step, or None for a dense model."""
    masks = SparseMasks(model)
    return _MaskCallback(masks) if masks else None


@structure.register_callbacks(KIND)
def _keep_masks(model: nn.Module) -> list[Callback]:
    # Every fine-tune of a 2:4 model keeps it 2:4 (the loop puts these first, before e.g. QAT reads weights).
    callback = mask_callback(model)
    return [callback] if callback is not None else []


@dataclass
class Sparsifier:
    """What :func:`apply_2to4` did, and the handle that keeps the masks during a user's training.

    Attributes:
        layers: per sparse layer, the share of ``sum |w|`` its mask kept (``retained``), and the
            permutation's before/after when ``permute`` ran.
        skipped: per Conv/Linear layer left dense, why.
        estimate: the pre-flight MACs summary (needs ``example_input``).
        permutations: per permuted channel group, what the search did.
        unpermuted: per sparse layer whose input channels ``permute`` did not reorder, why.
        permute_reason: why ``permute`` reordered nothing at all (None when it reordered some, or did not run).
    """

    model: nn.Module
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    estimate: dict[str, Any] = field(default_factory=dict)
    permutations: list[dict[str, Any]] = field(default_factory=list)
    unpermuted: dict[str, str] = field(default_factory=dict)
    permute_reason: str | None = None
    _hooks: list[Any] = field(default_factory=list, repr=False)
    _masks: SparseMasks | None = field(default=None, repr=False)

    @property
    def masks(self) -> SparseMasks:
        """The decoded masks, bound to the weights (decoded once, not at every step)."""
        if self._masks is None:
            self._masks = SparseMasks(self.model)
        return self._masks

    def apply(self) -> None:
        """Zero the masked weights again (call after ``optimizer.step()`` if no optimizer was hooked)."""
        self.masks.apply()

    def callback(self) -> Callback:
        """A ``compress.finetune`` callback (the loop adds one itself for models carrying masks)."""
        return _MaskCallback(self.masks)

    def remove(self) -> None:
        """Unhook the optimizer (the masks stay recorded on the model)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()

    def report(self) -> dict[str, Any]:
        found = {"pattern": PATTERN, "layers": self.layers, "skipped": self.skipped, "estimate": self.estimate,
                 "permutations": self.permutations, "unpermuted": self.unpermuted}
        return found | ({"permute_reason": self.permute_reason} if self.permute_reason else {})


def apply_2to4(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    example_input: torch.Tensor | None = None,
    permute: bool = False,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    where: str = "sparsity.apply_2to4",
) -> Sparsifier:
    """Make ``model``'s eligible Conv/Linear weights 2:4 sparse in place and keep them so.

    Keeps the 2 largest |w| of every 4 consecutive input-channel weights (per output channel and
    kernel position for convs). The masks are recorded on the model and each sparse layer keeps its own
    (:mod:`compress.sparsity.enforce`), so any optimizer, training loop, ``copy.deepcopy``,
    ``quant.prepare``, DDP, later stages and ``compress.save``/``load``/``restore`` keep them.

    Args:
        model: a float model (sparsify before quantizing).
        optimizer: only for an optimizer that already holds state from dense training (momentum, Adam
            moments, which would move masked weights): hooked so every ``optimizer.step()`` re-applies the
            masks, and its state is reordered with ``permute``. A new optimizer needs nothing.
        example_input: a batch the model accepts: needed for ``permute`` and for the MACs estimate.
        permute: reorder channels first (through their producers) so the masks keep more magnitude.
        include/exclude: layer-name patterns.

    Raises:
        CompressError: the model is already sparse or quantized, no layer is eligible, a pattern
            matches nothing, or ``permute`` without ``example_input``.

    Example::

        sparse = compress.sparsity.apply_2to4(model, example_input=x[:1], permute=True)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)   # any optimizer: the layers keep their masks
        for x, y in loader:
            loss = F.cross_entropy(model(x), y); optimizer.zero_grad(); loss.backward(); optimizer.step()
    """
    from compress import quant

    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module  # masks are recorded on (and saved from) the wrapped model
    if is_sparse(model):
        raise CompressError(f"{where}: the model is already 2:4 sparse")
    if quant.is_quantized(model):
        raise CompressError(f"{where}: sparsify before quantizing (ptq/qat): the quantizers' ranges would not "
                            "match the masked weights")
    if permute and example_input is None:
        raise CompressError(f"{where}: permute needs example_input (the channel dependencies are traced on it)")
    result = Sparsifier(model)
    chosen = plan(model, example_input, include, exclude, where, result)
    if permute:
        from compress.sparsity.permute import permute_groups

        assert example_input is not None
        device = next(model.parameters()).device
        groups = permute_groups(model, move_inputs(example_input, device), set(chosen), where)
        result.unpermuted, result.permute_reason = groups.unpermuted, groups.reason
        if optimizer is not None:
            _reorder_state(optimizer, groups)
        for p in groups:
            entry: dict[str, Any] = {"root": p.root, "channels": p.channels, "consumers": p.consumers,
                                     "swaps": p.swaps}
            if p.skipped:
                entry["skipped"] = p.skipped
            result.permutations.append(entry)
            for name, scores in p.layers.items():
                result.layers[name]["retained_unpermuted"] = scores["before"]
    masks = {name: mask_2to4(_weight(model, name)) for name in chosen}
    for name, mask in masks.items():
        weight = _weight(model, name)
        result.layers[name]["retained"] = round(retained(weight, mask), 6)
        with torch.no_grad():
            weight.mul_(mask.to(weight.device))
    record(model, masks)
    keep_masks(model)
    if optimizer is not None:
        result._hooks.append(optimizer.register_step_post_hook(lambda *_args: result.apply()))
    return result


@torch.no_grad()
def _reorder_state(optimizer: torch.optim.Optimizer, groups: list[Any]) -> None:
    """Reorder optimizer state (momentum, Adam moments) the way the permutation reordered its parameters."""
    for group in groups:
        for tensor, dim, index in group.reorders:
            for value in optimizer.state.get(tensor, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == tensor.shape:
                    value.copy_(value.index_select(dim, index.to(value.device)))


def plan(model: nn.Module, example_input: torch.Tensor | None, include: Sequence[str], exclude: Sequence[str],
         where: str, result: Sparsifier | None = None) -> list[str]:
    """The layers 2:4 would cover (filling ``result``'s skipped/estimate/layers).

    Raises:
        CompressError: a pattern matches nothing, or no layer is eligible.
    """
    if example_input is not None:
        example_input = move_inputs(example_input, next(model.parameters()).device)
    layers = eligible.survey(model, example_input, include, exclude, where)
    chosen = [layer.name for layer in layers if layer.skipped is None]
    if result is not None:
        result.skipped = {layer.name: layer.skipped for layer in layers if layer.skipped is not None}
        result.layers = {layer.name: layer.to_dict() for layer in layers if layer.skipped is None}
        if example_input is not None:
            result.estimate = eligible.estimate(layers)
    if not chosen:
        shown = "; ".join(f"{layer.name}: {layer.skipped}" for layer in layers[:4]) or "no Conv/Linear layer"
        raise CompressError(f"{where}: no layer can be 2:4 sparse ({shown})")
    return chosen
