"""The data spec of one split: a source (digits, npz, imagefolder, python factory) and its loader options."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, get_args

from pydantic import BaseModel, Discriminator, Field, Tag, field_validator

from compress.config import PathStr, Seed, Strict
from compress.imports import check_reference


class _LoaderOptions(Strict):
    # the ``--data`` shorthand (compress.data_arg): its form, and the field the text after "source:" fills
    SHORTHAND: ClassVar[str]
    MAIN_OPTION: ClassVar[str]

    batch_size: Annotated[int, Field(gt=0)] = 64
    limit: Annotated[int, Field(gt=0)] | None = None
    shuffle: bool | None = None  # None: shuffle the train split only
    workers: Annotated[int, Field(ge=0, le=128)] = 0  # each one a process: a typo must not fork thousands


class DigitsData(_LoaderOptions):
    """scikit-learn's ``load_digits`` (1797 8x8 images), split deterministically."""

    SHORTHAND = "digits[:SPLIT]"
    MAIN_OPTION = "split"

    source: Literal["digits"]
    split: Literal["train", "test", "all"] = "train"
    size: Annotated[int, Field(ge=8, le=512)] = 8
    channels: Literal[1, 3] = 1
    test_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.2
    seed: Seed = 0


class NpzData(_LoaderOptions):
    """Arrays in an ``.npz`` file; ``y: null`` for unlabeled data."""

    SHORTHAND = "npz:FILE"
    MAIN_OPTION = "path"

    source: Literal["npz"]
    path: PathStr
    x: str = "x"
    y: str | None = "y"


class ImageFolderData(_LoaderOptions):
    """torchvision ``ImageFolder``: one sub-folder per class."""

    SHORTHAND = "imagefolder:DIR"
    MAIN_OPTION = "root"

    source: Literal["imagefolder"]
    root: PathStr
    resize: Annotated[int, Field(gt=0, le=4096)] | None = None  # pixels a side: bounded so no image needs terabytes
    crop: Annotated[int, Field(gt=0, le=4096)] | None = None
    mean: list[float] = Field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[Annotated[float, Field(gt=0)]] = Field(default_factory=lambda: [0.229, 0.224, 0.225])
    grayscale: bool = False


class PythonData(_LoaderOptions):
    """``module:callable(**kwargs)`` returning a ``torch.utils.data.Dataset``."""

    SHORTHAND = "python:MODULE:FN"
    MAIN_OPTION = "factory"

    source: Literal["python"]
    factory: str
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("factory")
    @classmethod
    def _factory_ref(cls, v: str) -> str:
        return check_reference(v)


# The one list of data sources: a new source is a class above, added here (and a builder in compress.data).
DataSpec = Annotated[DigitsData | NpzData | ImageFolderData | PythonData, Field(discriminator="source")]
SOURCES: tuple[type[_LoaderOptions], ...] = get_args(get_args(DataSpec)[0])


def source_name(cls: type[_LoaderOptions]) -> str:
    """The ``source:`` value a spec class answers to (``"npz"`` for :class:`NpzData`)."""
    (name,) = get_args(cls.model_fields["source"].annotation)
    return str(name)


SOURCE_NAMES: tuple[str, ...] = tuple(source_name(cls) for cls in SOURCES)


class Holdout(Strict):
    """``val: {holdout: F}``: a fraction F of the train split, held out of training to select on.

    The samples are drawn once, seeded by the recipe's ``seed`` (stratified by label where the
    labels can be read without loading the samples), and removed from ``train``.
    """

    holdout: Annotated[float, Field(gt=0, lt=1)]


def _val_kind(value: Any) -> str | None:
    """Which form a ``data.val`` entry takes: a holdout of train, a split of its own, or neither (None)."""
    if isinstance(value, Holdout) or (isinstance(value, dict) and "holdout" in value):
        return _HOLDOUT_TAG
    return _SPLIT_TAG if isinstance(value, dict | BaseModel) else None


_HOLDOUT_TAG, _SPLIT_TAG = "val-holdout", "val-split"
ValSpec = Annotated[
    Annotated[Holdout, Tag(_HOLDOUT_TAG)] | Annotated[DataSpec, Tag(_SPLIT_TAG)],
    Discriminator(_val_kind, custom_error_type="val_form",
                  custom_error_message="expected {holdout: F} (a fraction of data.train) or a split (source: ...)"),
]


class DataSection(Strict):
    """The splits: ``train`` trains, ``val`` selects (keep_best, searches), ``eval`` is reported on."""

    train: DataSpec | None = None
    val: ValSpec | None = None
    calibration: DataSpec | None = None
    eval: DataSpec
