"""``Distiller``: teacher-student losses for the recipe stages and for users' own training loops.

In a training script::

    kd = compress.distill.Distiller(student, teacher, temperature=4, alpha=0.7,
                                    hints={"layer2": "layer2"}, example_input=x[:1])
    opt = torch.optim.SGD([*student.parameters(), *kd.parameters()], lr=0.01)
    for x, y in loader:
        loss = kd.loss(x, student(x), y)   # (1-alpha) CE + alpha T^2 KL + hint_weight * hints
        opt.zero_grad(); loss.backward(); opt.step()

or hand ``kd.callback()`` to :func:`compress.finetune`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from compress.callbacks import Callback, TrainState
from compress.distill.cache import Outputs, TeacherCache
from compress.distill.features import Features
from compress.distill.losses import Projection, hint_loss, kd_loss
from compress.distill.options import DistillOptions
from compress.errors import CompressError, DataError, first_line
from compress.inputs import Inputs, call_model, describe_inputs, move_inputs, tensors
from compress.outputs import select
from compress.positions import class_dim, lengths


def _forward(role: str, fn: Any, x: torch.Tensor, where: str) -> Any:
    """``fn(x)`` for the probe; a model that cannot take the data's inputs is bad input, said in one line."""
    try:
        return fn(x)
    except CompressError as exc:
        raise exc if str(exc).startswith(where) else CompressError(f"{where}: {exc}") from None
    except Exception as exc:  # a model from the recipe (a zero-width student, a wrong input size): not a compress bug
        raise CompressError(f"{where}: the {role} fails on an input of shape {describe_inputs(x)}: {first_line(exc)}") from None


class Distiller:
    """Runs the teacher (eval mode, no grad, once per batch or from its cache) and computes the loss.

    Args:
        student: the model being trained; hint layers are hooked on it until :meth:`close`.
        teacher: a trained model with the same output shape; put in eval mode, run under no_grad.
        temperature, alpha, hints, hint_loss, hint_weight, label_free, cache, cache_max_mb: as in
            the recipe's ``distill`` options (README, Distillation); ``alpha`` defaults to 0.7.
        example_input: one input batch; checks output shapes and sizes the hint projections now,
            so that :meth:`parameters` can go into the optimizer. Needed when a hint needs one.
        where: prefix of error messages (a recipe location).
        output: for models with several outputs, the one logits KD and the task loss take (default:
            the rule of :mod:`compress.outputs`).

    Raises:
        CompressError: an option out of range, an unknown hint layer, output shapes that differ.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        *,
        temperature: float = 4.0,
        alpha: float | None = None,
        hints: Mapping[str, str] | None = None,
        hint_loss: str = "mse",
        hint_weight: float = 1.0,
        label_free: bool = False,
        cache: bool = False,
        cache_max_mb: float = 1024.0,
        example_input: torch.Tensor | None = None,
        where: str = "distill",
        output: str | None = None,
    ) -> None:
        given = {"temperature": temperature, "hints": dict(hints or {}), "hint_loss": hint_loss,
                 "hint_weight": hint_weight, "label_free": label_free, "cache": cache, "cache_max_mb": cache_max_mb}
        if alpha is not None:  # default 0.7 with labels; label-free distillation has no task loss to mix
            given["alpha"] = alpha
        try:
            self.options = DistillOptions(**given)
        except ValidationError as exc:
            err = exc.errors(include_url=False)[0]
            field = ".".join(str(p) for p in err["loc"])
            raise CompressError(f"{where}{'.' + field if field else ''}: {err['msg']}") from None
        if {id(p) for p in student.parameters()} & {id(p) for p in teacher.parameters()}:
            raise CompressError(f"{where}.teacher: shares weights with the student; distill from a copy "
                                "(copy.deepcopy) so the teacher stays fixed")
        self.student, self.teacher, self.where, self.output = student, teacher.eval(), where, output
        hint_map = self.options.hints
        self._student_features = Features(student, list(hint_map), where=f"{where}.hints", whose="student", grad_only=True)
        try:
            self._teacher_features = Features(teacher, list(dict.fromkeys(hint_map.values())), where=f"{where}.hints",
                                              whose="teacher", grad_only=False)
        except CompressError:
            self._student_features.remove()
            raise
        self.projections = nn.ModuleDict()
        self.cache = TeacherCache(self.options.cache_max_mb, where) if self.options.cache else None
        self._sums: dict[str, torch.Tensor] = {}
        self._count = 0
        if example_input is not None:
            try:
                self.probe(example_input)
            except BaseException:
                self.close()  # a refused distiller leaves no hooks behind
                raise

    # ---------------------------------------------------------------- setup

    def probe(self, example_input: torch.Tensor) -> None:
        """Run student and teacher once (eval mode, no grad): check output shapes, build projections."""
        modes = {m: m.training for m in self.student.modules()}  # restored one by one (frozen BN stays so)
        device = _device_of(self.student, tensors(example_input)[0].device)
        x = move_inputs(example_input, device)
        self.student.eval()
        self._student_features.probing = True
        try:
            with torch.no_grad():
                student_out = _forward("student", lambda t: select(call_model(self.student, t), self.output), x, self.where)
                teacher_out = _forward("teacher", self._teacher_forward, x, self.where)
        finally:
            self._student_features.probing = False
            for module, training in modes.items():
                module.training = training
        check_outputs(student_out, teacher_out[""], self.where)
        self._build_projections({n: self._student_features.take(n) for n in self.options.hints}, teacher_out,
                                device, lazy=False)

    def _build_projections(self, student: Outputs, teacher: Outputs, device: torch.device, *, lazy: bool) -> None:
        for s_name, t_name in self.options.hints.items():
            proj = Projection(student[s_name].shape, teacher[t_name].shape, f"{self.where}.hints.{s_name}")
            if lazy and proj.map is not None:
                raise CompressError(
                    f"{self.where}.hints.{s_name}: needs a learned projection ({proj.summary}), which must exist "
                    "before the optimizer: pass example_input= to Distiller and add kd.parameters() to the optimizer"
                )
            self.projections[_key(s_name)] = proj.to(device)

    def parameters(self) -> Iterable[nn.Parameter]:
        """The hint projections' weights: train them with the student."""
        return self.projections.parameters()

    @property
    def task_weight(self) -> float:
        return self.options.task_weight

    # ---------------------------------------------------------------- teacher

    def _teacher_forward(self, inputs: torch.Tensor) -> Outputs:
        if self.teacher.training:
            self.teacher.eval()
        where = tensors(inputs)[0].device
        if _device_of(self.teacher, where) != where:
            self.teacher.to(where)
        with torch.no_grad():
            raw = call_model(self.teacher, inputs)
        try:
            out = select(raw, self.output)
        except CompressError as exc:
            raise CompressError(f"{self.where}.teacher: {exc}") from None
        return {"": out, **{n: self._teacher_features.take(n) for n in dict.fromkeys(self.options.hints.values())}}

    def teacher_outputs(self, inputs: torch.Tensor, indices: torch.Tensor | None = None) -> Outputs:
        """Teacher logits (key ``""``) and hint features for ``inputs``, from the cache when it has them."""
        if self.cache is not None and indices is not None:
            return self.cache.lookup(indices, inputs, self._teacher_forward)
        return self._teacher_forward(inputs)

    # ---------------------------------------------------------------- losses

    def _class_dim(self, inputs: Inputs, out: torch.Tensor) -> int:
        """The class axis of the task output (2 for per-token ``[N, T, C]``; see :mod:`compress.positions`)."""
        try:
            dim = class_dim([out.shape], [lengths(inputs, None)], self.output or "output")
        except CompressError as exc:
            raise CompressError(f"{self.where}: {exc}") from None
        return 1 if dim is None else dim

    def _task(self, student_out: Any) -> torch.Tensor:
        """The output KD takes from what the student returned (the fine-tune loop passes it already taken)."""
        return student_out if isinstance(student_out, torch.Tensor) else select(student_out, self.output)

    def distill_loss(
        self, inputs: torch.Tensor, student_out: torch.Tensor, *, indices: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``alpha * T^2 KL + hint_weight * mean(hints)`` (no task term): what the fine-tune loop adds."""
        student_out = self._task(student_out)
        teacher = self.teacher_outputs(inputs, indices)
        dim = self._class_dim(inputs, student_out)
        terms = {"kd_loss": kd_loss(student_out, teacher[""].to(student_out.device), self.options.temperature, dim)}
        total = self.options.kd_weight * terms["kd_loss"]
        if self.options.hints:
            student = {n: self._student_features.take(n) for n in self.options.hints if n in self._student_features.out}
            missing = [n for n in self.options.hints if n not in student]
            if missing:
                raise CompressError(f"{self.where}.hints.{missing[0]}: the student layer did not run in this forward pass")
            if len(self.projections) < len(self.options.hints):
                self._build_projections(student, teacher, student_out.device, lazy=True)
            hint_terms = [
                hint_loss(self.projections[_key(s)](student[s]), teacher[t].to(student_out.device), self.options.hint_loss)
                for s, t in self.options.hints.items()
            ]
            terms["hint_loss"] = torch.stack(hint_terms).mean()
            total = total + self.options.hint_weight * terms["hint_loss"]
        for name, value in terms.items():
            self._sums[name] = self._sums.get(name, 0.0) + value.detach().float()  # type: ignore[assignment]
        self._count += 1
        return total

    def loss(
        self,
        inputs: torch.Tensor,
        student_out: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        indices: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The whole training loss: ``(1 - alpha) * cross_entropy(student_out, labels) + distill_loss``.

        Call it right after ``student_out = student(inputs)`` (hint features come from that pass).
        ``indices`` (dataset indices of the batch) let a ``cache=True`` distiller reuse teacher outputs.

        Raises:
            CompressError: labels missing without ``label_free``, or output shapes that differ.
        """
        student_out = self._task(student_out)
        total = self.distill_loss(inputs, student_out, indices=indices)
        if self.task_weight > 0:
            if labels is None:
                raise CompressError(f"{self.where}: no labels given; pass labels, or use label_free=True")
            logits = student_out.float().movedim(self._class_dim(inputs, student_out), 1)  # cross_entropy: classes on 1
            total = total + self.task_weight * F.cross_entropy(logits, labels)
        return total

    def epoch_means(self) -> dict[str, float]:
        """Mean KD and hint losses since the last call (then reset)."""
        means = {name: round(float(value) / max(self._count, 1), 6) for name, value in self._sums.items()}
        self._sums, self._count = {}, 0
        return means

    def callback(self) -> Callback:
        """This distiller as a :func:`compress.finetune` callback."""
        return DistillCallback(self)

    def close(self) -> None:
        """Remove the forward hooks from student and teacher."""
        self._student_features.remove()
        self._teacher_features.remove()

    def __enter__(self) -> Distiller:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def report(self, teacher: str) -> dict[str, Any]:
        """For report.json: the teacher, options, hint projections, cache use."""
        info: dict[str, Any] = {
            "teacher": teacher,
            "temperature": self.options.temperature, "alpha": self.options.kd_weight,
            "label_free": self.options.label_free,
            "hints": [{"student": s, "teacher": t, "loss": self.options.hint_loss.value,
                       "projection": self.projections[_key(s)].summary if _key(s) in self.projections else None}
                      for s, t in self.options.hints.items()],
        }
        if self.cache is not None:
            info["cache"] = {"samples_from_cache": self.cache.reused, "samples_through_teacher": self.cache.computed,
                             "megabytes": round(self.cache.megabytes, 3)}
        return info


class DistillCallback(Callback):
    """Plugs a :class:`Distiller` into the shared fine-tune loop: the loop scales its task loss by
    ``1 - alpha`` (0 when label-free) and adds the distillation terms."""

    def __init__(self, distiller: Distiller) -> None:
        self.kd = distiller
        self._said_no_indices = False

    def parameters(self) -> Iterable[nn.Parameter]:
        # asked after the loop moved the model: the projections follow it (same Parameter objects)
        self.kd.projections.to(_device_of(self.kd.student, torch.device("cpu")))
        return self.kd.parameters()

    def on_train_start(self, state: TrainState) -> None:
        if self.kd.cache is not None:
            self.kd.cache.num_samples = max(self.kd.cache.num_samples, state.num_samples)
        self.kd.epoch_means()  # start the first epoch's means from zero

    def task_loss_weight(self, state: TrainState) -> float:
        return self.kd.task_weight

    def extra_loss(self, state: TrainState) -> torch.Tensor | None:
        assert state.inputs is not None and state.outputs is not None
        if state.labels is None and self.kd.task_weight > 0:
            raise DataError(f"{self.kd.where}: the training data has no labels; set label_free: true to "
                            "distill from the teacher alone")
        if self.kd.cache is not None and state.indices is None and not self._said_no_indices:
            self._said_no_indices = True  # once: the run is right, only slower than asked
            warnings.warn(f"{self.kd.where}.cache: the batches carry no dataset indices (compress.finetune uses "
                          "your DataLoader as given), so the teacher runs on every batch; pass reshard=True to "
                          "compress.finetune, or indices= to kd.loss in your own loop", stacklevel=2)
        return self.kd.distill_loss(state.inputs, state.outputs, indices=state.indices)

    def epoch_log(self) -> dict[str, float]:
        return self.kd.epoch_means()


def check_outputs(student_out: Any, teacher_out: Any, where: str) -> None:
    """Student and teacher must give tensors of one shape (logits KD compares them class by class).

    Raises:
        CompressError: naming ``where.teacher`` and both shapes.
    """
    if not isinstance(student_out, torch.Tensor) or not isinstance(teacher_out, torch.Tensor):
        raise CompressError(f"{where}.teacher: distillation needs models that return one tensor")
    if student_out.shape != teacher_out.shape:
        raise CompressError(
            f"{where}.teacher: outputs {list(teacher_out.shape)[1:]} per sample but the student outputs "
            f"{list(student_out.shape)[1:]}; logits KD needs the same output shape"
        )


def _key(layer: str) -> str:
    return "hint:" + layer.replace(".", "/")  # ModuleDict keys: no dots, no clash with its own attributes


def _device_of(model: nn.Module, default: torch.device) -> torch.device:
    tensor = next(model.parameters(), None)
    return tensor.device if tensor is not None else default
