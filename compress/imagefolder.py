"""The ``imagefolder`` source: torchvision's ``ImageFolder`` with a bounded, loop-free directory walk.

torchvision walks every class folder with ``followlinks=True`` and lists the whole tree before
looking at a single name, so a root such as ``/proc/self`` (whose ``root`` and ``cwd`` links lead
back to ``/``) never finishes. Here a class folder that is a symlink to the root or above it is
skipped, symlinked folders below a class folder are not entered, and the walk stops after
:data:`MAX_ENTRIES` names with one line saying so.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torchvision import datasets

from compress.errors import DataError

#: Names (files and folders) the walk reads before giving up: ImageNet's train split has 1.3 million.
MAX_ENTRIES = 5_000_000


def _loops_back(class_dir: Path, root: Path) -> bool:
    """True when ``class_dir`` resolves to ``root`` or a folder above it (walking it would never end)."""
    try:
        target = class_dir.resolve(strict=True)
    except (OSError, RuntimeError):  # a dangling or self-referencing link
        return True
    return root == target or root.is_relative_to(target)


def _class_names(root: Path) -> list[str]:
    """The class folders of ``root``: its sub-folders, in sorted order, minus links back to root or above."""
    try:
        entries = list(os.scandir(root))
    except OSError as exc:
        raise DataError(f"image folder {root} cannot be listed: {exc.strerror or exc}") from None
    names = []
    for entry in entries:
        try:
            is_dir = entry.is_dir()
        except OSError:
            continue
        if is_dir and not _loops_back(Path(entry.path), root.resolve()):
            names.append(entry.name)
    return sorted(names)


def _samples(root: Path, classes: list[str], is_valid: Callable[[str], bool], limit: int) -> list[tuple[str, int]]:
    """``(path, class index)`` of every valid file under each class folder, walked without following links."""
    seen = 0
    samples: list[tuple[str, int]] = []
    for index, name in enumerate(classes):
        for folder, dirs, files in os.walk(root / name, followlinks=False):  # errors (unreadable folders) skipped
            dirs.sort()
            seen += len(dirs) + len(files)
            if seen > limit:
                raise DataError(f"image folder {root}: more than {limit:,} files and folders under it; "
                                "point root at a folder with one sub-folder of images per class")
            samples.extend((os.path.join(folder, f), index) for f in sorted(files) if is_valid(os.path.join(folder, f)))
    return samples


class BoundedImageFolder(datasets.ImageFolder):
    """``ImageFolder`` whose class discovery and walk are bounded (see the module docstring)."""

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:  # type: ignore[override]
        classes = _class_names(Path(directory))
        if not classes:
            raise DataError(f"image folder {directory} has no class sub-folders (one folder of images per class)")
        return classes, {name: i for i, name in enumerate(classes)}

    @staticmethod
    def make_dataset(  # type: ignore[override]
        directory: str | Path,
        class_to_idx: dict[str, int],
        extensions: tuple[str, ...] | None = None,
        is_valid_file: Callable[[str], bool] | None = None,
        allow_empty: bool = False,
        **_: Any,
    ) -> list[tuple[str, int]]:
        exts = tuple(e.lower() for e in (extensions or datasets.folder.IMG_EXTENSIONS))
        valid = is_valid_file or (lambda path: path.lower().endswith(exts))
        classes = sorted(class_to_idx, key=class_to_idx.__getitem__)
        samples = _samples(Path(directory), classes, valid, MAX_ENTRIES)
        empty = sorted(set(classes) - {classes[i] for _, i in samples})
        if empty and not allow_empty:
            shown = ", ".join(empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
            raise DataError(f"image folder {directory}: no image files ({', '.join(exts)}) in class folder(s) {shown}")
        return samples
