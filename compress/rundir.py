"""The run directory's marker: which folders compress made, and which files in them it wrote.

``DIR/.compress-run.json`` (the manifest) says that compress made ``DIR`` and lists, relative to it,
every file a run wrote there. Only a marked folder is resumed or overwritten, ``--overwrite``
removes only the listed files (never a user's own files beside them), and nothing is ever read,
written or removed through a symbolic link inside the folder.

Files are recorded by comparing the folder with a listing taken when the run began: whatever is new
or was replaced since is the run's. The pipeline records after every stage and when the run ends
(an exception or Ctrl-C included); a run killed by SIGKILL mid-stage leaves that stage's files
unlisted, so ``--overwrite`` keeps them (never the other way round) and the next run replaces them.

A run is claimed (:func:`claim`: locked, then decided; nothing written) before the inputs are
checked, and started (:func:`start`: cleared if asked, marked, the recipe recorded) once they are good.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from compress import io
from compress.errors import CompressError, RecipeError
from compress.recipe import Recipe
from compress.runlock import LOCK_NAME, RunLock
from compress.train import broadcast_object, is_main_process

MARKER = ".compress-run.json"
_TEMP = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")  # io.atomic_path's temporary files (mkstemp names)
_Signature = tuple[int, int, int, int]


class Kind(Enum):
    """What an ``--out`` folder holds."""

    new = "new"  # missing, or empty (a lock file left by a killed run aside)
    run = "run"  # carries compress's marker
    legacy = "legacy"  # recipe.yaml but no marker: a run by compress <= 0.1.0, or not compress's at all
    foreign = "foreign"  # anything else: the user's folder


@dataclass
class Manifest:
    """The files (relative POSIX paths) that runs in this folder wrote."""

    files: set[str] = field(default_factory=set)

    @classmethod
    def read(cls, run_dir: Path) -> Manifest | None:
        """The folder's manifest, or None when it carries no marker.

        Raises:
            CompressError: the marker is a link, unreadable, or lists a path outside the folder.
        """
        path = run_dir / MARKER
        if not os.path.lexists(path):
            return None
        fix = "compress will not delete or resume from it; remove the folder yourself or use another --out"
        if path.is_symlink() or not path.is_file():
            raise CompressError(f"{path}: is not a regular file; {fix}")
        try:
            doc = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CompressError(f"{path}: is not a readable compress marker ({exc}); {fix}") from None
        if not isinstance(doc, dict) or doc.get("tool") != "compress":
            raise CompressError(f"{path}: is not a compress marker; {fix}")
        files = doc.get("files")
        if not isinstance(files, list) or not all(isinstance(f, str) and _inside(f) for f in files):
            raise CompressError(f"{path}: 'files' must list paths inside the folder; {fix}")
        return cls(set(files))

    def write(self, run_dir: Path) -> None:
        """Write the marker atomically."""
        io.write_json(run_dir / MARKER, {"tool": "compress", "format": 1, "files": sorted(self.files)})


def _inside(rel: str) -> bool:
    parts = PurePosixPath(rel).parts
    return bool(parts) and not PurePosixPath(rel).is_absolute() and all(p not in ("", ".", "..") for p in parts)


def is_plain_file(path: Path) -> bool:
    """``path`` is a regular file itself: not a link (never followed), folder, FIFO or device."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def kind(run_dir: Path) -> Kind:
    """Classify ``run_dir`` without changing it.

    Raises:
        CompressError: ``run_dir`` exists but is not a folder.
    """
    if not run_dir.exists():
        return Kind.new
    if not run_dir.is_dir():
        raise CompressError(f"{run_dir}: is a file, not a folder; name a new or empty folder for the run")
    names = {p.name for p in run_dir.iterdir()} - {LOCK_NAME}
    if MARKER in names:
        return Kind.run
    if not names:
        return Kind.new
    return Kind.legacy if "recipe.yaml" in names else Kind.foreign


def check_links(run_dir: Path, manifest: Manifest, dirs: Iterable[str]) -> None:
    """Refuse a marked folder in which a link sits where compress reads, writes or removes files.

    ``dirs``: folders (relative) the coming run writes into, beside those of the listed files.

    Raises:
        CompressError: naming the first such link.
    """
    wanted = set(dirs)
    for rel in manifest.files:
        wanted.update(str(p) for p in PurePosixPath(rel).parents if str(p) != ".")
    for rel in sorted(wanted, key=lambda r: (r.count("/"), r)):
        if (run_dir / rel).is_symlink():
            raise CompressError(f"{run_dir / rel}: is a symbolic link; compress never reads, writes or deletes through a "
                                "link in its run directory, and touched nothing; remove the link or use another --out")


def clear(run_dir: Path, manifest: Manifest) -> None:
    """Remove the files ``manifest`` lists (a link itself, never its target), then the folders left empty.

    Call :func:`check_links` first: no listed file's folder may be a link.
    """
    for rel in sorted(manifest.files):
        path = run_dir / rel
        if path.is_symlink() or path.is_file():
            path.unlink()
    parents = {p for rel in manifest.files for p in PurePosixPath(rel).parents if str(p) != "."}
    for parent in sorted(parents, key=lambda p: -len(p.parts)):  # deepest first
        folder = run_dir / parent
        if folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir()):
            folder.rmdir()
    manifest.files.clear()
    manifest.write(run_dir)


def remove_temp_files(run_dir: Path, manifest: Manifest, dirs: Iterable[str]) -> None:
    """Remove ``io.atomic_path`` temporaries a killed run left in the folders compress writes into."""
    folders = {"."} | set(dirs) | {str(p) for rel in manifest.files for p in PurePosixPath(rel).parents}
    for rel in folders:
        folder = run_dir / rel
        if not folder.is_dir() or folder.is_symlink():
            continue
        for entry in folder.iterdir():
            if _TEMP.match(entry.name) and (entry.is_symlink() or entry.is_file()):
                entry.unlink(missing_ok=True)


def _listing(run_dir: Path) -> dict[str, _Signature]:
    """Every regular file below ``run_dir`` (links neither listed nor followed) with what identifies its content."""
    found: dict[str, _Signature] = {}
    for root, _dirs, names in os.walk(run_dir):  # os.walk does not descend into linked folders
        for name in names:
            path = Path(root, name)
            rel = path.relative_to(run_dir).as_posix()
            if rel in (MARKER, LOCK_NAME) or _TEMP.match(name):
                continue
            st = path.lstat()
            if path.is_symlink() or not path.is_file():
                continue
            found[rel] = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
    return found


class Tracker:
    """Adds to the manifest every file that appeared or was replaced since the tracker was made."""

    def __init__(self, run_dir: Path, manifest: Manifest) -> None:
        self.run_dir = run_dir
        self.manifest = manifest
        self._before = _listing(run_dir)

    def record(self) -> None:
        """List the new and replaced files in the marker (rewritten only when that adds something)."""
        new = {rel for rel, sig in _listing(self.run_dir).items() if self._before.get(rel) != sig}
        if not new <= self.manifest.files:
            self.manifest.files |= new
            self.manifest.write(self.run_dir)


class Claim:
    """The run directory, created if missing and locked for this process until :meth:`release`.

    Folders it had to create are removed again on release if the run left them empty (it failed
    before writing anything), so a refused run leaves no trace.
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self._created: list[Path] = []
        missing = []
        folder = run_dir
        while not os.path.lexists(folder) and folder != folder.parent:
            missing.append(folder)
            folder = folder.parent
        if not folder.is_dir():
            if folder.is_symlink():
                what = "is a link to a missing folder" if folder == run_dir else f"{folder} is a link to no folder"
            else:
                what = "is a file, not a folder" if folder == run_dir else f"{folder} is not a folder"
            raise CompressError(f"{run_dir}: {what}; name a new or empty folder for the run")
        for folder in reversed(missing):
            try:
                folder.mkdir()
            except OSError as exc:
                self._remove_created()
                raise CompressError(f"{run_dir}: cannot create the run directory ({exc.strerror})") from None
            self._created.append(folder)
        try:
            self._lock: RunLock | None = RunLock.acquire(run_dir)
        except CompressError:
            self._remove_created()
            raise

    def release(self) -> None:
        """Unlock, and remove the folders this claim created if they are still empty."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        self._remove_created()

    def _remove_created(self) -> None:
        for folder in reversed(self._created):
            try:
                folder.rmdir()
            except OSError:  # not empty: the run wrote there
                break
        self._created = []


# --------------------------------------------------------------------------------------------
# How a run uses its directory (the pipeline calls claim, then start once its inputs are known good)


def _first_difference(a: Any, b: Any, path: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{path}.{key}" if path else str(key))
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            if x != y:
                return _first_difference(x, y, f"{path}.{i}")
    return f"{path or '(top level)'}: {a!r} then, {b!r} now"


def _run_dirs(recipe: Recipe) -> list[str]:
    """The folders (relative) a run of ``recipe`` writes into, beside the run directory itself."""
    return ["stages", "triton", *(f"stages/{spec.dirname}" for spec in recipe.stages)]


@dataclass
class Decision:
    """How a run uses its directory: reuse finished stages or not, and the marker's file list so far."""

    reuse: bool  # finished stages may be reused (--resume of a matching run)
    manifest: Manifest


def _decide(recipe: Recipe, run_dir: Path, *, resume: bool, overwrite: bool) -> Decision:
    """Decide how to use the run directory, writing nothing.

    Raises:
        CompressError: the folder is not compress's, holds a run and neither flag says what to do with it,
            has a link where the run would write, or (``--resume``) was run with another recipe.
    """
    found = kind(run_dir)
    if found is Kind.foreign:
        raise CompressError(f"{run_dir}: is not a compress run directory (no {MARKER}) and is not empty; "
                            "nothing was touched; name a new or empty folder with --out")
    if found is Kind.legacy:
        raise CompressError(f"{run_dir}: has a recipe.yaml but no {MARKER} marker (a run by compress 0.1.0 or "
                            "older, or not a compress run); only marked folders are resumed or overwritten, and "
                            "nothing was touched; run into a new --out (or delete the folder yourself)")
    manifest = Manifest.read(run_dir) or Manifest()
    check_links(run_dir, manifest, _run_dirs(recipe))
    saved = run_dir / "recipe.yaml"
    if not (saved.exists() or manifest.files):
        return Decision(False, manifest)
    if resume:
        if not saved.exists():
            raise CompressError(f"--resume: {run_dir} has no recipe.yaml (its run stopped before it began); "
                                "use --overwrite to start it again")
        if not is_plain_file(saved):  # a FIFO would block the read forever; a link would be read through
            raise CompressError(f"--resume: {saved} is not a regular file (a link, folder, FIFO or device); compress "
                                "never reads through one in its run directory; use --overwrite or another --out")
        try:
            before = yaml.safe_load(saved.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise CompressError(f"--resume: {saved} is not readable YAML: {exc}") from None
        resolved = recipe.resolved()
        if before != resolved:
            raise RecipeError(
                f"--resume: {run_dir} was run with a different recipe ({_first_difference(before, resolved)}); "
                "run without --resume into another --out"
            )
        return Decision(True, manifest)
    if not overwrite:
        raise CompressError(
            f"{run_dir} already holds a run; use --resume to continue it, --overwrite to replace it, or another --out"
        )
    read = _read_from(recipe.resolved(), run_dir, manifest)
    if read is not None:
        key, path = read
        raise RecipeError(f"{recipe.locate(*(int(p) if p.isdigit() else p for p in key.split('.')))}: --overwrite would delete {path}, which this recipe "
                          "reads; copy it out of the run directory first, or run into another --out")
    return Decision(False, manifest)


def _read_from(resolved: Any, run_dir: Path, manifest: Manifest) -> tuple[str, str] | None:
    """The first ``checkpoint`` the recipe reads (model, teacher, student) that --overwrite would remove."""
    listed = {os.path.realpath(run_dir / rel) for rel in manifest.files}

    def walk(value: Any, key: str) -> tuple[str, str] | None:
        if isinstance(value, dict):
            return next((hit for k, v in value.items() if (hit := walk(v, f"{key}.{k}" if key else str(k)))), None)
        if isinstance(value, list):
            return next((hit for i, v in enumerate(value) if (hit := walk(v, f"{key}.{i}"))), None)
        if key.rsplit(".", 1)[-1] == "checkpoint" and isinstance(value, str) and os.path.realpath(value) in listed:
            return key, value
        return None

    return walk(resolved, "")


def claim(recipe: Recipe, run_dir: Path, *, resume: bool, overwrite: bool) -> tuple[Claim | None, Decision]:
    """Rank 0 locks the run directory and decides how to use it; every rank gets the decision or the error.

    Returns:
        The claim (rank 0; release it when the run ends) and the decision.

    Raises:
        CompressError: the folder is locked by another run, cannot be written, or may not be used (see ``_decide``).
    """
    held, decision, error = None, Decision(False, Manifest()), None
    if is_main_process():
        try:
            held = Claim(run_dir)
            decision = _decide(recipe, run_dir, resume=resume, overwrite=overwrite)
        except CompressError as exc:
            error = exc
        except OSError as exc:  # e.g. a folder we may not list
            error = CompressError(f"{run_dir}: cannot use the run directory ({exc.strerror or exc})")
    reuse, error = broadcast_object((decision.reuse, error))  # under torchrun every rank stops, or none
    if error is not None:
        if held is not None:
            held.release()
        raise error
    decision.reuse = reuse
    return held, decision


def start(recipe: Recipe, run_dir: Path, decision: Decision, *, overwrite: bool) -> Tracker | None:
    """Called once the recipe, model and data are known good: clear (if asked), mark, and record the recipe.

    Returns the tracker that lists the run's files in the marker (rank 0 only; None on the other ranks).
    """
    if not is_main_process():
        return None
    manifest = decision.manifest
    check_links(run_dir, manifest, _run_dirs(recipe))  # again: a link may have appeared while the inputs were checked
    remove_temp_files(run_dir, manifest, _run_dirs(recipe))  # left by a run killed mid-write
    if overwrite and not decision.reuse:
        clear(run_dir, manifest)  # only the files earlier runs wrote
    manifest.write(run_dir)  # marked before the first file is written
    tracker = Tracker(run_dir, manifest)
    if not decision.reuse:
        io.write_text(run_dir / "recipe.yaml", yaml.safe_dump(recipe.resolved(), sort_keys=False))
        tracker.record()
    return tracker
