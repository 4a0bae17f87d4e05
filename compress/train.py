"""The one fine-tune loop every stage uses.

``finetune(model, data, FinetuneConfig(...))`` trains in place with SGD or AdamW, a cosine/step/
constant schedule, optional AMP, evaluation each epoch and best-weights restore. Stages plug in
through :class:`Callback` (before/after each step, an extra loss term). Under
``torchrun --nproc_per_node=N`` it runs as DDP (gloo on CPU, nccl on GPU). A user's DataLoader is
iterated as given (under DDP its sampler is wrapped so each process takes its share); the recipe runner
asks for ``reshard``: the batch size is then the global batch, split evenly across processes, so N
processes see exactly the batches one would.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Annotated, Any

import torch
import torch.distributed as dist
from pydantic import Field
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Sampler

from compress import metrics, positions, structure
from compress.callbacks import Callback, TrainState
from compress.config import Seed, Strict
from compress.data import split_batch
from compress.errors import CompressError, DataError
from compress.inputs import batch_size, call_model, move_inputs
from compress.outputs import select


class OptimizerKind(str, Enum):
    sgd = "sgd"
    adamw = "adamw"


class ScheduleKind(str, Enum):
    cosine = "cosine"
    step = "step"
    constant = "constant"


class FinetuneConfig(Strict):
    """Options shared by every stage's ``finetune`` block."""

    epochs: Annotated[int, Field(ge=0, le=100_000)] = 1  # a bound: a typo like 1e9 must not run forever
    lr: Annotated[float, Field(gt=0)] = 0.01
    optimizer: OptimizerKind = OptimizerKind.sgd
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    weight_decay: Annotated[float, Field(ge=0)] = 1e-4
    schedule: ScheduleKind = ScheduleKind.cosine
    step_size: Annotated[int, Field(gt=0)] | None = None  # epochs between x gamma decays (schedule: step)
    gamma: Annotated[float, Field(gt=0, le=1)] = 0.1
    batch_size: Annotated[int, Field(gt=0)] | None = None  # global batch; default: the train split's
    amp: bool = False
    keep_best: bool = True
    grad_clip: Annotated[float, Field(gt=0)] | None = None
    seed: Seed | None = None


# --------------------------------------------------------------------------------------------
# Distributed helpers


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of this process; ``(0, 1)`` when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def is_main_process() -> bool:
    """True on rank 0: the only process that writes files."""
    return world()[0] == 0


def init_distributed(device: torch.device) -> bool:
    """Join the process group torchrun set up (if any). Returns True when running distributed."""
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return True


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if _distributed():
        dist.barrier()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (the identity when not distributed)."""
    if not _distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _sync_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's BatchNorm statistics, so all ranks score (and keep) the same model."""
    if _distributed():
        for buf in model.buffers():
            dist.broadcast(buf, src=0)


def pick_device(name: str = "auto") -> torch.device:
    """``auto``: this process's CUDA device under torchrun, else ``cuda`` if present, else ``cpu``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CompressError(f"device '{name}' asked for, but no CUDA GPU is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CompressError(f"device '{name}' asked for, but this machine has {torch.cuda.device_count()} CUDA "
                                f"GPU(s): cuda:0..cuda:{torch.cuda.device_count() - 1}")
        if device.index is None and "LOCAL_RANK" in os.environ:
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


class ShardedBatchSampler(Sampler[list[int]]):
    """Global batches of ``batch_size`` from one seeded permutation; each rank takes its slice.

    Rank ``r`` of ``w`` gets ``batch[r::w]`` of every global batch, so the union over ranks of
    step ``k`` is exactly the single-process batch ``k``. The last partial batch is dropped when
    there is more than one batch, so every rank does the same number of steps.
    """

    def __init__(self, n: int, batch_size: int, *, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1):
        if batch_size % world_size:
            raise CompressError(f"finetune.batch_size {batch_size} must be divisible by the {world_size} processes")
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.rank, self.world_size, self.epoch = rank, world_size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return max(1, self.n // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        else:
            order = list(range(self.n))
        for k in range(len(self)):
            batch = order[k * self.batch_size : (k + 1) * self.batch_size]
            yield batch[self.rank :: self.world_size]


# --------------------------------------------------------------------------------------------
# Callbacks


@dataclass
class FinetuneResult:
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int | None = None
    best_score: float | None = None


# --------------------------------------------------------------------------------------------
# The loop


def _lr_factor(config: FinetuneConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """Multiplier of the base learning rate at each optimizer step."""
    total = max(1, config.epochs * steps_per_epoch)
    size = config.step_size or max(1, config.epochs // 3)
    schedules: dict[ScheduleKind, Callable[[int], float]] = {
        ScheduleKind.cosine: lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total)),
        ScheduleKind.step: lambda step: config.gamma ** ((step // steps_per_epoch) // size),
        ScheduleKind.constant: lambda step: 1.0,
    }
    return schedules[config.schedule]


def _optimizer(model: nn.Module, config: FinetuneConfig, extra: list[nn.Parameter]) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise CompressError("finetune: the model has no trainable parameters")
    params += extra
    makers: dict[OptimizerKind, Callable[[], torch.optim.Optimizer]] = {
        OptimizerKind.sgd: lambda: torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        ),
        OptimizerKind.adamw: lambda: torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay),
    }
    return makers[config.optimizer]()


def _as_given(data: DataLoader, config: FinetuneConfig, seed: int, rank: int, world_size: int,
              distributed: bool) -> DataLoader:
    """The user's loader itself; under DDP the same loader with its sampler wrapped per process."""
    if config.batch_size is not None and config.batch_size != data.batch_size:
        raise CompressError(f"finetune: batch_size is {config.batch_size} but the DataLoader's is {data.batch_size}; "
                            "a DataLoader is used as given: build it with that batch size, or pass its dataset")
    if not distributed:
        return data
    if data.batch_size is None:
        raise CompressError("finetune: under DDP the DataLoader needs a batch_size (its sampler is split across "
                            "processes); a custom batch_sampler cannot be split")
    sampler = DistributedSampler(data.dataset, num_replicas=world_size, rank=rank,  # type: ignore[arg-type]
                                 shuffle=isinstance(data.sampler, RandomSampler), seed=seed, drop_last=False)
    return DataLoader(data.dataset, batch_size=data.batch_size, sampler=sampler, collate_fn=data.collate_fn,
                      num_workers=data.num_workers, pin_memory=data.pin_memory, drop_last=data.drop_last)


def _num_samples(loader: DataLoader) -> int:
    try:
        return len(loader.dataset)  # type: ignore[arg-type]
    except TypeError:
        return 0


def _as_loader(
    data: DataLoader | Dataset, config: FinetuneConfig, seed: int, rank: int, world_size: int
) -> DataLoader:
    if isinstance(data, DataLoader):
        dataset, collate, workers = data.dataset, data.collate_fn, data.num_workers
        batch_size = config.batch_size or data.batch_size or 64
        shuffle = isinstance(data.sampler, RandomSampler)
    else:
        dataset, collate, workers = data, None, 0
        batch_size, shuffle = config.batch_size or 64, True
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise DataError("finetune: the training data is empty")
    sampler = ShardedBatchSampler(n, batch_size, shuffle=shuffle, seed=seed, rank=rank, world_size=world_size)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers)


def finetune(
    model: nn.Module,
    data: DataLoader | Dataset,
    config: FinetuneConfig,
    *,
    evaluate: Callable[[nn.Module], float] | None = None,
    callbacks: Sequence[Callback] = (),
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    desc: str = "finetune",
    output: str | None = None,
    reshard: bool = False,
) -> FinetuneResult:
    """Fine-tune ``model`` in place; with ``evaluate`` and ``keep_best``, restore the best epoch.

    What it changes: ``model``'s parameters and BatchNorm statistics (the best epoch's, with ``evaluate``
    and ``keep_best``), and its device (moved to ``device``). What it leaves: the model's train/eval mode
    (restored at the end, also on error), the caller's global RNG (a seeded private copy is used), and a
    DataLoader passed as ``data``, which is iterated as given: its batch size, sampler, collate and last
    partial batch. Only under DDP is its sampler wrapped (a ``DistributedSampler`` keeping its shuffle,
    dropping nothing), so each process takes its share.

    A model carrying structure that training must keep (2:4 masks from ``compress.sparsity``) keeps it
    itself in any loop; its structure's callbacks (:func:`compress.structure.callbacks`) run first too.

    Args:
        model: trained in place (moved to ``device``).
        data: a DataLoader (used as given), or a Dataset (batched by ``config.batch_size``, shuffled).
        config: optimizer, schedule, epochs, batch size, AMP. ``batch_size`` must be unset (or equal the
            loader's) for a DataLoader.
        evaluate: ``model -> score`` (higher is better), called after each epoch.
        callbacks: hooks run around every step; ``extra_loss`` terms are added to the loss.
        loss_fn: ``(outputs, labels) -> loss``; default cross-entropy.
        device: default: where the model's parameters are.
        progress: show a progress bar (rank 0 only).
        output: for a model with several outputs, the one the loss (and callbacks' ``state.outputs``)
            takes (default: the rule of :mod:`compress.outputs`).
        reshard: batch the loader's dataset anew as seeded global batches of ``config.batch_size`` split
            across DDP processes, so N processes see exactly one process's batches and callbacks get each
            batch's dataset indices (the recipe runner's mode; the last partial batch is dropped).

    Returns:
        Per-epoch history and the best epoch/score.

    Raises:
        DataError: no labels and no callback providing a loss, or empty data.
        CompressError: ``config.batch_size`` differs from the DataLoader's, or the loader has no length.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    # The model's recorded structure keeps itself (a 2:4 model stays 2:4): its callbacks first, before e.g. QAT
    # reads the weights.
    callbacks = [*structure.callbacks(model), *callbacks]
    seed = config.seed if config.seed is not None else 0
    # Seed a private copy of the RNG state: the caller's global RNG is left as it was.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        was_training = model.training
        try:
            return _finetune(model, data, config, seed, evaluate, callbacks, loss_fn, device, progress, desc, output,
                             reshard)
        finally:
            model.train(was_training)


def _finetune(
    model: nn.Module,
    data: DataLoader | Dataset,
    config: FinetuneConfig,
    seed: int,
    evaluate: Callable[[nn.Module], float] | None,
    callbacks: Sequence[Callback],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None,
    device: torch.device,
    progress: bool,
    desc: str,
    output: str | None = None,
    reshard: bool = False,
) -> FinetuneResult:
    from tqdm.auto import tqdm

    model.to(device)
    distributed = init_distributed(device)
    rank, world_size = world()
    if isinstance(data, DataLoader) and not reshard:
        loader = _as_given(data, config, seed, rank, world_size, distributed)
    else:
        loader = _as_loader(data, config, seed, rank, world_size)
    sharded = loader.batch_sampler if isinstance(loader.batch_sampler, ShardedBatchSampler) else None
    try:
        steps_per_epoch = len(loader)
    except TypeError:
        raise CompressError("finetune: the DataLoader has no length (an IterableDataset?); the schedule needs the "
                            "number of steps per epoch: give the dataset a __len__") from None
    if steps_per_epoch == 0:
        raise DataError("finetune: the training data is empty")
    extra = [p for cb in callbacks for p in getattr(cb, "parameters", lambda: ())()]
    optimizer = _optimizer(model, config, extra)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(config, steps_per_epoch))
    use_amp = config.amp and device.type in ("cuda", "cpu")
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp and device.type == "cuda")
    if distributed:
        ids = [device.index] if device.type == "cuda" else None
        net: nn.Module = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        for p in extra:  # callback-owned weights (distillation projections) start equal on every rank
            dist.broadcast(p.data, src=0)
    else:
        net = model
    state = TrainState(model=model, optimizer=optimizer, total_steps=config.epochs * steps_per_epoch,
                       num_samples=_num_samples(loader))
    criterion = loss_fn or nn.functional.cross_entropy
    result = FinetuneResult()
    best_state: dict[str, torch.Tensor] | None = None
    try:
        for cb in callbacks:
            cb.on_train_start(state)
        for epoch in range(config.epochs):
            state.epoch = epoch
            for sampler in (sharded, loader.sampler):  # new shuffles per epoch (sharded, distributed)
                if hasattr(sampler, "set_epoch"):
                    sampler.set_epoch(epoch)  # type: ignore[union-attr]
            net.train()
            total, count = 0.0, 0
            # disable=None: tqdm turns itself off when stderr is not a terminal (CI logs stay readable)
            bar = tqdm(
                loader, desc=f"{desc} {epoch + 1}/{config.epochs}", leave=False,
                disable=True if (not progress or rank != 0) else None,
            )
            # a sharded sampler repeats its seeded order, so each batch's dataset indices are known
            for batch, indices in zip(bar, iter(sharded), strict=True) if sharded else ((b, None) for b in bar):
                x, y = split_batch(batch)
                x = move_inputs(x, device)
                y = y.to(device, non_blocking=True) if isinstance(y, torch.Tensor) else None
                state.inputs, state.labels = x, y
                state.indices = torch.as_tensor(indices) if indices is not None else None
                for cb in callbacks:
                    cb.before_step(state)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                    out = select(call_model(net, x), output)
                    state.outputs = out
                    terms = [cb_loss for cb in callbacks if (cb_loss := cb.extra_loss(state)) is not None]
                    weight = math.prod(getattr(cb, "task_loss_weight", lambda _s: 1.0)(state) for cb in callbacks)
                    if y is not None:
                        dim = _class_dim(out, x, y)
                        if state.step == 0:
                            metrics.check_labels(out, y, "finetune", dim)
                        if weight > 0:
                            logits = out.float() if loss_fn else out.float().movedim(dim, 1)
                            terms.insert(0, weight * criterion(logits, y))
                if not terms:
                    raise DataError("finetune: the training data has no labels and no callback provides a loss")
                loss = torch.stack([t.float() for t in terms]).sum()
                if not torch.isfinite(loss):
                    raise CompressError(f"finetune: loss became {float(loss)} at epoch {epoch + 1}; lower finetune.lr")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if distributed:
                    _average_gradients(extra, world_size)
                if config.grad_clip is not None:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_([*model.parameters(), *extra], config.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                state.loss = loss = loss.detach()
                for cb in callbacks:
                    cb.after_step(state)
                state.step += 1
                total += float(loss) * batch_size(x)
                count += batch_size(x)
                bar.set_postfix(loss=f"{total / count:.4f}")
            for cb in callbacks:
                cb.on_epoch_end(state)
            entry: dict[str, Any] = {"epoch": epoch + 1, "loss": total / max(count, 1)}
            for cb in callbacks:
                entry.update(getattr(cb, "epoch_log", dict)())
            if evaluate is not None:
                _sync_buffers(model)
                entry["score"] = score = float(evaluate(model))
                eligible = all(getattr(cb, "epoch_is_result", lambda _s: True)(state) for cb in callbacks)
                # ties go to the later epoch: a small val split saturates (every epoch 1.0), and then the
                # model trained longest is the one to keep, not the first to touch the ceiling
                if config.keep_best and eligible and (result.best_score is None or score >= result.best_score):
                    result.best_score, result.best_epoch = score, epoch + 1
                    best_state = copy.deepcopy(model.state_dict())
            result.history.append(entry)
    finally:
        for cb in callbacks:
            getattr(cb, "on_train_end", lambda _s: None)(state)
    if best_state is not None:
        model.load_state_dict(best_state)
    return result


def _class_dim(out: torch.Tensor, inputs: Any, labels: torch.Tensor) -> int:
    """The class axis of the task output: 2 for per-token ``[N, T, C]`` logits (:mod:`compress.positions`; the
    default loss moves it to 1, where cross-entropy takes classes, and skips -100 labels), else 1."""
    try:
        dim = positions.class_dim([out.shape], [positions.lengths(inputs, labels)], "output")
    except CompressError as exc:
        raise CompressError(f"finetune: {exc}") from None
    return 1 if dim is None else dim


def _average_gradients(params: list[nn.Parameter], world_size: int) -> None:
    """DDP averages the model's gradients; callback-owned weights are averaged here, the same way."""
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world_size
