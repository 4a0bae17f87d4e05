"""Data spec -> ``DataLoader`` for the sources digits, npz, imagefolder and python.

Every loader built here checks its batches: empty datasets, NaN/Inf inputs, samples of different
shapes and label/input count mismatches raise :class:`DataError` naming the split.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset, default_collate

from compress.data_arg import check_factory_kwargs, describe_spec, parse_data_arg
from compress.data_config import DataSpec, DigitsData, ImageFolderData, NpzData, PythonData
from compress.errors import CompressError, DataError, first_line
from compress.imports import resolve
from compress.inputs import Inputs, batch_size, concat, is_inputs, normalize, take

_LABEL_KEYS = ("label", "labels", "y", "target")
_INPUT_KEYS = ("input", "inputs", "x", "image")  # a dict holding one of these (and a label) feeds model(x)


def split_batch(batch: Any) -> tuple[Inputs, torch.Tensor | None]:
    """``(inputs, labels or None)`` from the batch layouts datasets commonly return.

    ``x``, ``(x,)``, ``(x, y)``: one input tensor, or, where ``x`` is itself a tuple of tensors, several
    (``model(*x)``). A dict: its label key (``label``, ``labels``, ``y``, ``target``) is the label; one
    input key (``input``, ``inputs``, ``x``, ``image``) is the one input tensor, otherwise every other
    entry is an input by name (``model(**x)``: ``input_ids``, ``attention_mask``, ``pixel_values``, ...).
    """
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and len(batch) > 2:
        raise DataError(f"a batch of {len(batch)} items, which reads as neither x nor (x, y): return ((ids, mask), y) "
                        "for several inputs, or a dict of named tensors with a 'labels' entry")
    if isinstance(batch, (tuple, list)) and batch:
        x = batch[0]
        y = batch[1] if len(batch) > 1 else None
        if is_inputs(x):
            return normalize(x), y
    if isinstance(batch, dict):
        y = next((batch[k] for k in _LABEL_KEYS if k in batch), None)
        rest = {k: v for k, v in batch.items() if k not in _LABEL_KEYS}
        single = [k for k in _INPUT_KEYS if k in rest]
        if single and isinstance(rest[single[0]], torch.Tensor):
            return rest[single[0]], y
        if is_inputs(rest):
            return dict(rest), y
    raise DataError(f"cannot find inputs in a batch of type {type(batch).__name__}; return (x, y) or x, "
                    "or a dict of named input tensors")


class _FiniteTensorDataset(TensorDataset):
    """A TensorDataset whose inputs were verified finite when loaded (digits, npz)."""


def _verified_finite(dataset: Dataset) -> bool:
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return isinstance(dataset, _FiniteTensorDataset)


class _CheckedDataset(Dataset):
    """Wraps a dataset so a sample that fails to load or holds NaN/Inf is reported by index (and file)."""

    def __init__(self, dataset: Dataset, name: str) -> None:
        self.dataset, self.name = dataset, name
        self.scan = not _verified_finite(dataset)  # no second scan of arrays checked whole at load time

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def _where(self, index: int) -> str:
        samples = getattr(self.dataset, "samples", None)  # torchvision ImageFolder: (path, class) pairs
        if isinstance(samples, list) and 0 <= index < len(samples) and isinstance(samples[index], tuple):
            return f"sample {index} ({samples[index][0]})"
        return f"sample {index}"

    def __getitem__(self, index: int) -> Any:
        try:
            sample = self.dataset[index]
        except CompressError:
            raise
        except Exception as exc:  # a user's dataset or a broken file: bad input, not a compress bug
            raise DataError(f"{self.name}: {self._where(index)} cannot be loaded: {first_line(exc)}") from None
        if not self.scan:
            return sample
        x = sample[0] if isinstance(sample, (tuple, list)) and sample else sample
        if isinstance(x, dict):  # named inputs (and the label, which is not checked here)
            parts = [v for k, v in x.items() if k not in _LABEL_KEYS]
        else:
            parts = list(x) if isinstance(x, (tuple, list)) else [x]
        for part in parts:
            if isinstance(part, np.ndarray) and np.issubdtype(part.dtype, np.floating):
                part = torch.from_numpy(part)
            if isinstance(part, torch.Tensor) and part.is_floating_point() and not bool(torch.isfinite(part).all()):
                raise DataError(f"{self.name}: {self._where(index)} contains NaN or Inf inputs")
        return sample


class _CheckedCollate:
    """Collate, then refuse non-tensor inputs and mismatched label counts, naming the split."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, samples: list[Any]) -> Any:
        try:
            batch = default_collate(samples)
        except (RuntimeError, TypeError) as exc:
            raise DataError(f"{self.name}: samples cannot be batched (different shapes or types?): {exc}") from None
        try:
            x, y = split_batch(batch)
            n = batch_size(x)
        except DataError as exc:
            raise DataError(f"{self.name}: {exc}") from None
        # NaN/Inf inputs are caught per sample by _CheckedDataset, which can name the sample.
        if isinstance(y, torch.Tensor) and y.shape[:1] != (n,):
            raise DataError(f"{self.name}: {y.shape[0]} labels for {n} inputs in a batch")
        return batch


def _sklearn(name: str = "digits") -> None:
    """scikit-learn is an extra (it ships the digits images): say which one when it is missing."""
    try:
        import sklearn  # noqa: F401
    except ImportError:
        raise DataError(f"{name}: the digits source needs scikit-learn: pip install 'compress[digits]'") from None


@lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    _sklearn()
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images.astype(np.float32), digits.target.astype(np.int64)


def _digits(spec: DigitsData, name: str) -> Dataset:
    _sklearn(name)
    from sklearn.model_selection import train_test_split

    images, labels = _digits_arrays()
    if spec.split != "all":
        # sklearn's rule (test = ceil(n * f)); stratified, so each side needs a sample of every class
        n, classes = len(labels), len(np.unique(labels))
        n_test = int(np.ceil(n * spec.test_fraction))
        if min(n_test, n - n_test) < classes:
            raise DataError(f"{name}: test_fraction {spec.test_fraction} splits the {n} digits into {n - n_test} train "
                            f"and {n_test} test samples; each side needs at least {classes} (one per class)")
        idx_train, idx_test = train_test_split(
            np.arange(len(labels)), test_size=spec.test_fraction, random_state=spec.seed, stratify=labels
        )
        idx = np.sort(idx_train if spec.split == "train" else idx_test)
        images, labels = images[idx], labels[idx]
    x = torch.from_numpy(images).unsqueeze(1) / 8.0 - 1.0  # pixel values 0..16 -> [-1, 1]
    if spec.size != 8:
        x = torch.nn.functional.interpolate(x, size=(spec.size, spec.size), mode="bilinear", align_corners=False)
    if spec.channels == 3:
        x = x.expand(-1, 3, -1, -1).contiguous()
    return _FiniteTensorDataset(x, torch.from_numpy(labels))  # from load_digits: always finite


def _npz(spec: NpzData, name: str) -> Dataset:
    path = Path(spec.path)
    if not path.is_file():
        raise DataError(f"{name}: npz file {path} not found")
    if not zipfile.is_zipfile(path):
        raise DataError(f"{name}: {path} is not an npz file (save arrays with numpy.savez)")
    try:
        with np.load(path, allow_pickle=False) as arrays:
            keys = list(arrays.keys())
            if spec.x not in keys:
                raise DataError(f"{name}: {path} has no array '{spec.x}' (arrays: {', '.join(keys) or 'none'})")
            if spec.y is not None and spec.y not in keys:
                raise DataError(f"{name}: {path} has no array '{spec.y}' (arrays: {', '.join(keys)}); y: null for unlabeled")
            x = np.asarray(arrays[spec.x])
            y = np.asarray(arrays[spec.y]) if spec.y is not None else None
    except DataError:
        raise
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise DataError(f"{name}: cannot read {path} as npz: {first_line(exc)}") from None
    if not np.issubdtype(x.dtype, np.number):
        raise DataError(f"{name}: {path} array '{spec.x}' has dtype {x.dtype}; expected numbers")
    if x.ndim < 1:
        raise DataError(f"{name}: {path} array '{spec.x}' is a scalar; expected one sample per row")
    xt = torch.from_numpy(x.astype(np.float32, copy=False))
    bad = ~torch.isfinite(xt)
    if bool(bad.any()):
        first = int(bad.reshape(len(xt), -1).any(1).nonzero()[0])
        raise DataError(f"{name}: {path} array '{spec.x}' has {int(bad.sum())} NaN/Inf values (first in sample {first})")
    if y is None:
        return _FiniteTensorDataset(xt)
    if len(y) != len(x):
        raise DataError(f"{name}: {path} has {len(x)} inputs '{spec.x}' but {len(y)} labels '{spec.y}'")
    yt = torch.from_numpy(y.astype(np.int64) if np.issubdtype(y.dtype, np.integer) else y.astype(np.float32))
    return _FiniteTensorDataset(xt, yt)


def _imagefolder(spec: ImageFolderData, name: str) -> Dataset:
    from torchvision import transforms

    from compress.imagefolder import BoundedImageFolder

    root = Path(spec.root)
    if not root.is_dir():
        raise DataError(f"{name}: image folder {root} not found")
    steps: list[Any] = []
    if spec.grayscale:
        steps.append(transforms.Grayscale())
    if spec.resize:
        steps.append(transforms.Resize(spec.resize))
    if spec.crop:
        steps.append(transforms.CenterCrop(spec.crop))
    mean, std = (spec.mean[:1], spec.std[:1]) if spec.grayscale else (spec.mean, spec.std)
    steps += [transforms.ToTensor(), transforms.Normalize(mean, std)]
    try:
        return BoundedImageFolder(str(root), transform=transforms.Compose(steps))
    except DataError as exc:
        raise DataError(f"{name}: {exc}") from None
    except (FileNotFoundError, OSError) as exc:
        raise DataError(f"{name}: {root}: {exc}") from None


def _python(spec: PythonData, name: str) -> Dataset:
    fn = resolve(spec.factory, what=f"{name}.factory")
    check_factory_kwargs(spec, name)
    try:
        dataset = fn(**spec.kwargs)
    except CompressError:
        raise
    except Exception as exc:  # a user's factory: report any failure as bad input, with its type
        raise DataError(f"{name}: factory '{spec.factory}' raised {type(exc).__name__}: {exc}") from None
    if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
        raise DataError(f"{name}: factory '{spec.factory}' returned {type(dataset).__name__}, not a sized Dataset")
    return dataset


def dataset_size(dataset: Dataset, name: str) -> int:
    """``len(dataset)``, refusing a ``__len__`` that is negative, not an int, too large or failing.

    Raises:
        DataError: naming the split.
    """
    try:
        return len(dataset)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError) as exc:  # len() itself refuses -1, 1.5, 2**70
        raise DataError(f"{name}: the dataset's __len__ is unusable: {first_line(exc)}") from None
    except CompressError:
        raise
    except Exception as exc:  # a user's dataset
        raise DataError(f"{name}: the dataset's __len__ raised {first_line(exc)}") from None


def _origin(spec: DataSpec) -> str:
    """Where a spec's samples come from, for messages: ``npz data/x.npz``."""
    if isinstance(spec, NpzData):
        return f"npz {spec.path}"
    if isinstance(spec, ImageFolderData):
        return f"imagefolder {spec.root}"
    if isinstance(spec, PythonData):
        return f"python factory {spec.factory}"
    return f"{spec.source} split {spec.split}"


# one builder per source class of compress.data_config.SOURCES (tests/test_data.py checks none is missing)
BUILDERS: dict[type[Any], Callable[[Any, str], Dataset]] = {
    DigitsData: _digits, NpzData: _npz, ImageFolderData: _imagefolder, PythonData: _python,
}


def build_dataset(spec: DataSpec, name: str = "data") -> Dataset:
    """The dataset for a spec, after ``limit``; refuses an empty one.

    Raises:
        DataError: the data is missing, empty or malformed.
    """
    build = BUILDERS.get(type(spec))
    if build is None:  # pragma: no cover - the recipe schema admits only compress.data_config.SOURCES
        raise DataError(f"{name}: unsupported data source {type(spec).__name__}")
    dataset = build(spec, name)
    size = dataset_size(dataset, name)
    if spec.limit is not None and spec.limit < size:
        dataset = Subset(dataset, range(spec.limit))
    if size == 0:
        raise DataError(f"{name}: dataset is empty ({_origin(spec)})")
    return dataset


def make_loader(
    dataset: Dataset, name: str, *, batch_size: int = 64, shuffle: bool = False, workers: int = 0, seed: int = 0
) -> DataLoader:
    """A DataLoader whose batches are checked (see :class:`_CheckedCollate`)."""
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(
        dataset if isinstance(dataset, _CheckedDataset) else _CheckedDataset(dataset, name),
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=workers,
        collate_fn=_CheckedCollate(name),
        generator=generator,
    )


def build_loader(
    spec: DataSpec, name: str = "data", *, train: bool = False, seed: int = 0, dataset: Dataset | None = None
) -> DataLoader:
    """The checked DataLoader for a recipe data spec (``shuffle`` defaults to ``train``).

    Args:
        dataset: the samples, when already built from ``spec`` (a part of it: a holdout); default:
            :func:`build_dataset`. ``spec`` then gives the batch size, shuffle and workers only.
    """
    if dataset is None:
        dataset = build_dataset(spec, name)
    shuffle = train if spec.shuffle is None else spec.shuffle
    return make_loader(dataset, name, batch_size=spec.batch_size, shuffle=shuffle, workers=spec.workers, seed=seed)


def example_input(loader: DataLoader, batch: int = 1) -> Inputs:
    """The first ``batch`` inputs of a loader (every input tensor), for tracing, export and MACs counting."""
    x, _ = split_batch(next(iter(loader)))
    return take(x, slice(0, batch))


def check_class_labels(loader: DataLoader, name: str) -> None:
    """Refuse a split whose first batch has fractional labels, one per sample, where class indices are needed.

    Cross-entropy and top1 read such labels as class numbers (or fail deep inside torch); soft labels,
    one row of probabilities per sample, stay allowed.

    Raises:
        DataError: ``data.train: labels are torch.float32 numbers ...``.
    """
    _, y = split_batch(next(iter(loader)))
    if isinstance(y, torch.Tensor) and y.ndim == 1 and (y.is_floating_point() or y.is_complex()):
        raise DataError(f"{name}: labels are {y.dtype} numbers; a classification split needs integer class "
                        "labels (0..classes-1)")


def stack_inputs(loader: DataLoader) -> tuple[Inputs, torch.Tensor | None]:
    """All inputs (and labels, if every batch has them) of a loader, concatenated on the CPU."""
    xs: list[Inputs] = []
    ys: list[torch.Tensor] = []
    for batch in loader:
        x, y = split_batch(batch)
        xs.append(x)
        if isinstance(y, torch.Tensor):
            ys.append(y)
    labels = torch.cat(ys) if len(ys) == len(xs) else None
    return concat(xs), labels


__all__: Sequence[str] = [
    "build_dataset",
    "build_loader",
    "example_input",
    "make_loader",
    "describe_spec",
    "parse_data_arg",
    "split_batch",
    "stack_inputs",
]
