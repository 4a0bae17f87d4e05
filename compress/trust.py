"""Which model factories a checkpoint file may name.

A compress checkpoint is pickle-free, but it says which ``module:callable`` rebuilds its model, and
loading calls it with the file's kwargs. A file can come from anywhere, so the factory it names is
called only when

- it is the factory the user gave (the recipe's ``model.factory``, a teacher's ``factory``), or
- its module is one compress trusts (:data:`TRUSTED_MODULES`: our zoo and torchvision's model
  builders), or one the user trusts by name (recipe ``model.trust: [mypkg.models]``, CLI
  ``--trust mypkg.models``, API ``compress.load(path, trust=[...])``).

Even then the callable must be a plain public name defined in that module's package:
``torchvision.models.resnet:torch.hub.load`` walks out of the trusted module and is refused.
"""

from __future__ import annotations

import sys
from collections.abc import Collection, Sequence
from typing import Any

from compress.errors import CheckpointError, CompressError
from compress.imports import check_reference, resolve

# Model builders whose every public callable only constructs a module (pretrained weights at most,
# which :func:`safe_kwargs` turns off for a file's kwargs).
TRUSTED_MODULES = ("compress.zoo", "torchvision.models")
# Packages whose callables can call anything else (os.system, compress.models:build, torch.hub.load):
# trusting them would trust every file, so they cannot be trusted by name.
_UNTRUSTABLE = {"compress", "torch", "builtins", *sys.stdlib_module_names}
# Builder arguments that fetch pretrained weights (torchvision unpickles what it downloads or finds in
# its cache). A checkpoint carries its own weights, so a file's kwargs never need them.
PRETRAINED_KWARGS = ("weights", "weights_backbone", "pretrained", "pretrained_backbone")


def safe_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` without the arguments that make a builder download or load pretrained weights."""
    return {k: v for k, v in kwargs.items() if k not in PRETRAINED_KWARGS}


def check_module_name(name: str) -> str:
    """A ``trust`` entry: a dotted module name (``mypkg.models``), nothing that could be a path.

    Raises:
        ValueError: not a dotted module name.
    """
    if not isinstance(name, str) or not name or any(not part.isidentifier() for part in name.split(".")):
        raise ValueError(f"'{name}' is not a module name like 'mypkg.models'")
    if _untrustable(name):
        raise ValueError(f"'{name}' cannot be trusted: its callables can call any code; trust your own model module")
    return name


def _untrustable(module: str) -> bool:
    return module.split(".")[0] in _UNTRUSTABLE and not any(_within(module, m) for m in TRUSTED_MODULES)


def _within(module: str, trusted: str) -> bool:
    return module == trusted or module.startswith(trusted + ".")


def check_factory(factory: object, source: str, *, trust: Sequence[str] = (), named: Collection[str] = ()) -> str:
    """Refuse a factory named by a file unless the user gave it or trusts its module.

    Args:
        factory: the ``module:callable`` string the file names.
        source: the file, for messages.
        trust: module names the user trusts, beside :data:`TRUSTED_MODULES`.
        named: the exact factories the user gave (a recipe's model, teacher and student factories): allowed.

    Raises:
        CheckpointError: the factory is malformed, untrusted, or escapes its trusted module.
    """
    if not isinstance(factory, str):
        raise CheckpointError(f"checkpoint {source}: its factory is a {type(factory).__name__}, not a 'module:callable' string")
    try:
        check_reference(factory)
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {source}: {exc}") from None
    if factory in named:
        return factory
    module, _, attr = factory.partition(":")
    allowed = [m for m in (*TRUSTED_MODULES, *trust) if _within(module, m)]
    if not allowed:
        hint = ("a module that can call any code cannot be trusted" if _untrustable(module) else
                f"if you trust this file, pass --trust {module} (in a recipe: model.trust: [{module}])")
        raise CheckpointError(f"checkpoint {source}: names factory '{factory}', and compress calls only the factories "
                              f"of {', '.join(TRUSTED_MODULES)} and of modules you trust; {hint}")
    if "." in attr or attr.startswith("_") or any(part.startswith("_") for part in module.split(".")):
        raise CheckpointError(f"checkpoint {source}: factory '{factory}' reaches through '{attr}'; a factory a file "
                              "names must be a public name defined in its module")
    try:
        fn = resolve(factory, what="model factory")
    except CompressError as exc:  # a trusted module without that name (renamed, removed)
        raise CheckpointError(f"checkpoint {source}: cannot rebuild its model: {exc}") from None
    defined_in = getattr(fn, "__module__", None) or ""
    if not any(_within(defined_in, m) for m in allowed):
        raise CheckpointError(f"checkpoint {source}: factory '{factory}' is '{defined_in or '?'}' code imported into "
                              f"{module}, not a factory of it; if you trust that module, pass --trust {defined_in or module}")
    return factory
