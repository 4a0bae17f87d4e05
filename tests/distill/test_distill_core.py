"""Distillation losses, the Distiller, its cache and the shared loop's callback path, on digits."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch.utils.data import Dataset, TensorDataset

import compress
from compress.data import build_loader
from compress.distill import Distiller, HintLoss, hint_loss, kd_loss
from compress.distill.losses import Projection
from compress.errors import CompressError, DataError
from compress.recipe import DigitsData


def digits(split: str, batch_size: int = 64, shuffle: bool = False):
    return build_loader(DigitsData(source="digits", split=split, batch_size=batch_size, shuffle=shuffle), split)


def test_kd_loss_is_t_squared_kl_of_the_softened_distributions():
    torch.manual_seed(0)
    s, t = torch.randn(5, 10), torch.randn(5, 10) * 3
    T = 4.0
    p_t = F.softmax(t / T, dim=1)
    expected = (p_t * (p_t.log() - F.log_softmax(s / T, dim=1))).sum(1).mean() * T * T
    assert kd_loss(s, t, T).item() == pytest.approx(expected.item(), rel=1e-5)
    assert kd_loss(t, t, T).item() == pytest.approx(0.0, abs=1e-6)
    # [N, C, H, W] outputs (segmentation): averaged over every position, same as flattening them
    s4, t4 = torch.randn(2, 10, 3, 3), torch.randn(2, 10, 3, 3)
    flat = kd_loss(s4.permute(0, 2, 3, 1).reshape(-1, 10), t4.permute(0, 2, 3, 1).reshape(-1, 10), T)
    assert kd_loss(s4, t4, T).item() == pytest.approx(flat.item(), rel=1e-5)


def test_hint_losses_and_projection_shapes():
    s, t = torch.randn(4, 8, 6, 6), torch.randn(4, 8, 6, 6)
    assert hint_loss(s, t, HintLoss.mse).item() == pytest.approx(((s - t) ** 2).mean().item(), rel=1e-5)
    cos = F.cosine_similarity(s.flatten(1), t.flatten(1)).mean()
    assert hint_loss(s, t, HintLoss.cosine).item() == pytest.approx(1 - cos.item(), rel=1e-5)
    assert hint_loss(s, 2 * s, HintLoss.cosine).item() == pytest.approx(0.0, abs=1e-6)  # scale-free
    proj = Projection(torch.Size([4, 8, 6, 6]), torch.Size([4, 16, 3, 3]), "a")
    assert proj(s).shape == (4, 16, 3, 3) and proj.summary == "conv1x1 8->16, pool to [3, 3]"
    lin = Projection(torch.Size([4, 5, 8]), torch.Size([4, 5, 12]), "b")
    assert lin(torch.randn(4, 5, 8)).shape == (4, 5, 12) and lin.summary == "linear 8->12"
    assert Projection(torch.Size([4, 8]), torch.Size([4, 8]), "c").summary is None  # identity
    with pytest.raises(CompressError, match=r"distill.hints.d: .* same rank"):
        Projection(torch.Size([4, 8, 6, 6]), torch.Size([4, 8]), "distill.hints.d")


@pytest.fixture(scope="module")
def teacher():
    """digits_mlp trained 6 epochs (~96% test top1)."""
    torch.manual_seed(0)
    model = compress.build("compress.zoo:digits_mlp", {"hidden": 64})
    compress.finetune(model, digits("train", shuffle=True), compress.FinetuneConfig(epochs=6, lr=0.05, seed=0),
                      progress=False)
    return model.eval()


def _student(seed: int = 1, hidden: int = 32):
    torch.manual_seed(seed)
    return compress.build("compress.zoo:digits_mlp", {"hidden": hidden})


def test_a_student_identical_to_its_teacher_has_zero_distillation_loss(teacher):
    x = torch.randn(16, 1, 8, 8)
    student = copy.deepcopy(teacher).train()
    with Distiller(student, teacher, hints={"2": "2"}, example_input=x[:1]) as kd:
        out = student(x)
        assert kd.distill_loss(x, out).item() == pytest.approx(0.0, abs=1e-6)
        assert list(kd.parameters()) == []  # same width: no projection
        assert kd.epoch_means() == {"kd_loss": pytest.approx(0.0, abs=1e-6), "hint_loss": pytest.approx(0.0, abs=1e-6)}


def test_label_free_kd_trains_a_student_from_unlabeled_inputs(teacher):
    x_train, _ = next(iter(digits("train", batch_size=2000)))
    unlabeled = TensorDataset(x_train)  # inputs only
    student = _student()
    with pytest.raises(DataError, match="no labels"):
        compress.finetune(copy.deepcopy(student), unlabeled, compress.FinetuneConfig(epochs=1), progress=False)
    kd = Distiller(student, teacher, label_free=True, temperature=2.0)
    result = compress.finetune(student, unlabeled, compress.FinetuneConfig(epochs=8, lr=0.05, batch_size=64, seed=0),
                               callbacks=[kd.callback()], progress=False)
    kd.close()
    x_test, y_test = next(iter(digits("test", batch_size=400)))
    with torch.no_grad():
        predicted = student(x_test).argmax(1)
        agree = (predicted == teacher(x_test).argmax(1)).float().mean().item()
    assert agree >= 0.9 and (predicted == y_test).float().mean().item() >= 0.88
    assert result.history[-1]["kd_loss"] < result.history[0]["kd_loss"] * 0.5  # logged per epoch


def test_alpha_one_ignores_the_labels_entirely(teacher):
    # Labels scrambled: with alpha 1 the task term gets weight 0, so training equals label-free KD.
    x, y = next(iter(digits("train", batch_size=2000)))
    scrambled = TensorDataset(x, y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))])
    a, b = _student(), _student()
    config = compress.FinetuneConfig(epochs=2, lr=0.05, batch_size=64, seed=0)
    with Distiller(a, teacher, alpha=1.0) as kd_a, Distiller(b, teacher, label_free=True) as kd_b:
        compress.finetune(a, scrambled, config, callbacks=[kd_a.callback()], progress=False)
        compress.finetune(b, TensorDataset(x), config, callbacks=[kd_b.callback()], progress=False)
    for key, value in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[key], value, msg=key)


class _Counting(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


def test_a_cache_without_dataset_indices_says_so_once_and_runs_the_teacher_live(teacher):
    student = _student(hidden=16)
    counting = _Counting(teacher)
    config = compress.FinetuneConfig(epochs=2, lr=0.05, seed=0, keep_best=False)
    with Distiller(student, counting, cache=True) as kd, \
            pytest.warns(UserWarning, match=r"cache: the batches carry no dataset indices .* reshard=True") as said:
        compress.finetune(student, digits("train", shuffle=True), config, callbacks=[kd.callback()], progress=False)
        assert kd.report("t")["cache"]["samples_from_cache"] == 0
    assert len([w for w in said if "dataset indices" in str(w.message)]) == 1
    assert counting.calls >= 2 * 22  # every batch of both epochs through the teacher


def test_cached_teacher_trains_exactly_like_the_live_one_with_fewer_teacher_passes(teacher):
    train = digits("train", shuffle=True)
    config = compress.FinetuneConfig(epochs=3, lr=0.05, seed=0, keep_best=False)
    students, counters = {}, {}
    for cache in (False, True):
        counters[cache] = counting = _Counting(teacher)
        students[cache] = student = _student(hidden=16)
        with Distiller(student, counting, hints={"2": "inner.2"}, cache=cache,
                       example_input=torch.zeros(1, 1, 8, 8)) as kd:
            # reshard: batches of dataset indices, which the cache keys on (a loader as given has none)
            compress.finetune(student, train, config, callbacks=[kd.callback()], progress=False, reshard=True)
            if cache:
                cached = kd.report("t")["cache"]
                assert cached["samples_from_cache"] + cached["samples_through_teacher"] == 3 * 22 * 64
                assert cached["samples_through_teacher"] == 1437  # each training sample once
                assert cached["megabytes"] == pytest.approx(1437 * (10 + 64) * 4 / 2**20, abs=1e-3)
    for key, value in students[False].state_dict().items():
        torch.testing.assert_close(students[True].state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key)
    steps = 3 * 22  # 1437 // 64 batches per epoch
    assert counters[False].calls == steps + 1  # + the probe
    assert counters[True].calls <= 22 + 22 + 1  # epoch 1 fills; epoch 2 runs only samples epoch 1 dropped


class _Augmented(Dataset):
    """Random noise on every read: inputs differ between epochs."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i] + 0.1 * torch.randn_like(self.x[i]), self.y[i]


def test_cache_refuses_inputs_that_change_between_epochs_and_outputs_over_its_budget(teacher):
    x, y = next(iter(digits("train", batch_size=256)))
    config = compress.FinetuneConfig(epochs=2, lr=0.05, batch_size=64, seed=0)
    with Distiller(_student(), teacher, cache=True) as kd, pytest.raises(CompressError, match=r"distill.cache: .*augmentation"):
        compress.finetune(kd.student, _Augmented(x, y), config, callbacks=[kd.callback()], progress=False)
    with Distiller(_student(), teacher, cache=True, cache_max_mb=0.001) as kd, \
            pytest.raises(CompressError, match=r"distill.cache: 256 samples x 40 bytes .* > cache_max_mb 0.001"):
        compress.finetune(kd.student, TensorDataset(x, y), config, callbacks=[kd.callback()], progress=False)


def test_distiller_errors_name_the_option(teacher):
    s = _student()
    with pytest.raises(CompressError, match=r"^distill.temperature: Input should be greater than 0"):
        Distiller(s, teacher, temperature=0)
    with pytest.raises(CompressError, match=r"^distill.alpha: Input should be less than or equal to 1"):
        Distiller(s, teacher, alpha=1.5)
    with pytest.raises(CompressError, match=r"^distill.hints: the teacher has no layer 'fc'"):
        Distiller(s, teacher, hints={"1": "fc"})
    with pytest.raises(CompressError, match=r"label_free uses no labels"):
        Distiller(s, teacher, label_free=True, alpha=0.5)
    wide = compress.build("compress.zoo:digits_mlp", {"num_classes": 12})
    with pytest.raises(CompressError, match=r"^distill.teacher: outputs \[12\] per sample but the student outputs \[10\]"):
        Distiller(s, wide, example_input=torch.zeros(1, 1, 8, 8))
    # No example input: the projection would appear after the optimizer was built, so say so.
    x = torch.randn(4, 1, 8, 8)
    with Distiller(s, teacher, hints={"2": "2"}) as kd, \
            pytest.raises(CompressError, match=r"distill.hints.2: needs a learned projection \(linear 32->64\).*example_input"):
        kd.loss(x, s(x), torch.zeros(4, dtype=torch.long))
    with pytest.raises(CompressError, match="no labels given"):
        Distiller(s, teacher).loss(x, s(x))


def test_the_core_finetune_config_has_no_recipe_teacher():
    """A recipe's ``finetune.distill`` names a teacher only a stage can resolve; in a user's own loop the
    Distiller callback carries the teacher, so the core config refuses the field."""
    with pytest.raises(ValidationError, match=r"unknown key 'distill'"):
        compress.FinetuneConfig(distill={"teacher": "baseline"})


def test_projection_weights_are_trained_and_hooks_removed_on_close(teacher):
    student = _student(hidden=16)
    kd = Distiller(student, teacher, hints={"2": "2"}, example_input=torch.zeros(1, 1, 8, 8))
    before = [p.detach().clone() for p in kd.parameters()]
    compress.finetune(student, digits("train", shuffle=True), compress.FinetuneConfig(epochs=1, seed=0),
                      callbacks=[kd.callback()], progress=False)
    after = list(kd.parameters())
    assert len(after) == 1 and after[0].shape == (64, 16) and not torch.equal(before[0], after[0])
    kd.close()
    assert not any(m._forward_hooks for m in [*student.modules(), *teacher.modules()])  # also none leaked by refusals
    assert math.isfinite(kd.report("t")["temperature"])


def test_distiller_guards_user_models(teacher):
    x, _ = next(iter(digits("train", batch_size=256)))
    with pytest.raises(CompressError, match=r"distill.teacher: shares weights with the student"):
        Distiller(teacher, teacher)
    student = compress.build("compress.zoo:digits_cnn", {"width": 8}).train()
    student.stem[1].eval()  # a BatchNorm the user froze stays frozen through the probe
    with Distiller(student, compress.build("compress.zoo:digits_cnn"), example_input=x[:1]) as kd:
        assert student.training and not student.stem[1].training
        with pytest.raises(DataError, match=r"distill: the training data has no labels; set label_free: true"):
            compress.finetune(student, TensorDataset(x), compress.FinetuneConfig(epochs=1), callbacks=[kd.callback()],
                              progress=False)
