"""The frontend registry: which readers turn a checkpoint path into the IR.

Megatron-LM / Megatron-Core saves (legacy ``torch``, ``torch_dist``, NeMo and Megatron-Bridge wrappers) are the
built-in frontend and the default. Packages add frontends through the ``mexc.frontends`` entry-point group::

    [project.entry-points."mexc.frontends"]
    my-format = "my_package.frontend:FRONTEND"

``FRONTEND`` has a ``name``, ``detect(path) -> bool`` (cheap: file names, a small header; never a tensor) and
``lift(path, *, iteration, config, overrides) -> mexc.ir.Model``. :func:`lift` asks each installed frontend, in
name order, and falls back to the Megatron frontend, whose errors name what a Megatron save must hold.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError

if TYPE_CHECKING:
    from ..ir import Model

GROUP = "mexc.frontends"


@lru_cache(maxsize=1)
def plugins() -> tuple[tuple[str, str], ...]:
    """(entry-point name, value) of the installed frontends, in name order; nothing imported yet."""
    from importlib.metadata import entry_points

    return tuple(sorted((ep.name, ep.value) for ep in entry_points(group=GROUP)))


def _load(name: str, value: str):
    import importlib

    module, _, attr = value.partition(":")
    try:
        obj = importlib.import_module(module)
        for part in filter(None, attr.split(".")):
            obj = getattr(obj, part)
    except Exception as e:
        raise CheckpointError(f"frontend {name} = {value} ({GROUP}) failed to load: {type(e).__name__}: {e}",
                              hint="fix or uninstall the package that declares it") from e
    if not all(callable(getattr(obj, f, None)) for f in ("detect", "lift")):
        raise CheckpointError(f"frontend {name} = {value} ({GROUP}) has no detect() and lift()",
                              hint="point the entry point at an object with detect(path) and lift(path, ...)")
    return obj


def frontend_for(path: str | Path):
    """``(name, frontend)`` of the first installed frontend that detects ``path``; ``("megatron", None)`` when
    none does (the built-in frontend then reads it, or says why it cannot)."""
    for name, value in plugins():
        fe = _load(name, value)
        try:
            found = fe.detect(Path(path))
        except Exception as e:
            raise CheckpointError(f"{path}: frontend {name} ({GROUP}) failed to inspect it: "
                                  f"{type(e).__name__}: {e}", hint="fix or uninstall the package that declares it") \
                from e
        if found:
            return name, fe
    return "megatron", None


def lift(path: str | Path, *, iteration: int | None = None, config: str | Path | None = None,
         overrides: dict[str, Any] | None = None) -> "Model":
    """The IR of the checkpoint at ``path``, from the first installed frontend that detects it, else from the
    Megatron frontend (:func:`mexc.frontends.megatron.lift`). A plugin's model gets ``meta["frontend"]``."""
    name, fe = frontend_for(path)
    if fe is None:
        from .megatron import lift as megatron_lift

        return megatron_lift(path, iteration=iteration, config=config, overrides=overrides)
    model = fe.lift(Path(path), iteration=iteration, config=config, overrides=overrides)
    model.meta.setdefault("frontend", name)
    return model
