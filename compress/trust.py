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

from collections.abc import Sequence

from compress.errors import CheckpointError, CompressError
from compress.imports import check_reference, resolve

# Model builders whose every public callable only constructs a module (pretrained weights at most).
TRUSTED_MODULES = ("compress.zoo", "torchvision.models")


def check_module_name(name: str) -> str:
    """A ``trust`` entry: a dotted module name (``mypkg.models``), nothing that could be a path.

    Raises:
        ValueError: not a dotted module name.
    """
    if not name or any(not part.isidentifier() for part in name.split(".")):
        raise ValueError(f"'{name}' is not a module name like 'mypkg.models'")
    return name


def _within(module: str, trusted: str) -> bool:
    return module == trusted or module.startswith(trusted + ".")


def check_factory(factory: object, source: str, *, trust: Sequence[str] = (), named: str | None = None) -> str:
    """Refuse a factory named by a file unless the user gave it or trusts its module.

    Args:
        factory: the ``module:callable`` string the file names.
        source: the file, for messages.
        trust: module names the user trusts, beside :data:`TRUSTED_MODULES`.
        named: the factory the user gave for this model, if any (always allowed).

    Raises:
        CheckpointError: the factory is malformed, untrusted, or escapes its trusted module.
    """
    if not isinstance(factory, str):
        raise CheckpointError(f"checkpoint {source}: its factory is a {type(factory).__name__}, not a 'module:callable' string")
    try:
        check_reference(factory)
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {source}: {exc}") from None
    if named is not None and factory == named:
        return factory
    module, _, attr = factory.partition(":")
    allowed = [m for m in (*TRUSTED_MODULES, *trust) if _within(module, m)]
    hint = f"pass --trust {module} (in a recipe: model.trust: [{module}])"
    if not allowed:
        raise CheckpointError(f"checkpoint {source}: names factory '{factory}', and compress calls only the factories "
                              f"of {', '.join(TRUSTED_MODULES)} and of modules you trust; if you trust this file, {hint}")
    if "." in attr or attr.startswith("_"):
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
