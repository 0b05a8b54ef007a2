"""The target registry: which ``--target`` names exist and which module provides each.

Built-in targets are listed here by module (imported only when used, so ``mexc --help`` loads no backend);
packages add targets through the ``mexc.backends`` entry-point group, as passes do through ``mexc.passes``::

    [project.entry-points."mexc.backends"]
    my-target = "my_package.backend"     # importing it calls mexc.backends.base.register_backend(...)

The CLI's ``--target`` choices, :func:`get_backend` and ``mexc verify``'s runtime choice all derive from this,
and so do the options each target takes (:func:`options_class`: the backend's ``options`` attribute, a subclass
of :class:`mexc.backends.options.CompileOptions`).
"""

from __future__ import annotations

import importlib
from functools import lru_cache

from typing import TYPE_CHECKING

from ..errors import BackendError, UsageError

if TYPE_CHECKING:
    from .base import Backend
    from .options import CompileOptions

BUILTIN = {"trtllm": "mexc.backends.trtllm", "hf": "mexc.backends.hf", "onnx": "mexc.backends.onnx",
           "tensorrt": "mexc.backends.onnx"}
GROUP = "mexc.backends"


@lru_cache(maxsize=1)
def _plugins() -> tuple[dict[str, str], dict[str, str]]:
    """(entry-point name -> module, for new names; the entries that reuse a built-in name, which are refused
    when that target is asked for)."""
    from importlib.metadata import entry_points

    found, shadows = {}, {}
    for ep in entry_points(group=GROUP):
        (shadows if ep.name in BUILTIN else found)[ep.name] = ep.value
    return found, shadows


def target_names() -> tuple[str, ...]:
    """Every ``--target`` name: the built-in ones, then installed plugins' (sorted)."""
    return (*BUILTIN, *sorted(_plugins()[0]))


def get_backend(target: str) -> "Backend":
    """The registered backend for ``target``, importing its module on first use.

    Raises :class:`UsageError` for an unknown name and :class:`BackendError` when its module fails to import
    or does not register the name."""
    from .base import BACKENDS

    plugins, shadows = _plugins()
    if target in shadows:
        raise BackendError(f"entry point {target} = {shadows[target]} ({GROUP}) shadows the built-in target "
                           f"{target!r}", hint="rename the target in the package that declares it, or uninstall it")
    modules = {**BUILTIN, **plugins}
    if target not in modules:
        raise UsageError(f"unknown target {target!r}", hint=f"use one of {', '.join(target_names())}")
    if target not in BACKENDS:
        try:
            importlib.import_module(modules[target].split(":")[0])
        except ImportError as e:
            raise BackendError(f"the {target} backend cannot be loaded: {e}",
                               hint="reinstall mexc with its dependencies (pip install .)" if target in BUILTIN
                               else f"fix or uninstall the package that declares {target} ({GROUP})") from e
        except Exception as e:  # noqa: BLE001 - a plugin's own bug on import: one line naming the entry point
            if target in BUILTIN:
                raise
            msg = (str(e).strip().splitlines() or [""])[-1][:300]
            raise BackendError(f"entry point {target} = {modules[target]} ({GROUP}) failed on import "
                               f"({type(e).__name__}: {msg})",
                               hint=f"fix or uninstall the package that declares {target}; `mexc --debug` shows "
                                    "the traceback") from e
    if target not in BACKENDS:
        raise BackendError(f"importing {modules[target]} did not register target {target!r}",
                           hint="its module must call mexc.backends.base.register_backend(...) on import")
    return BACKENDS[target]


def options_class(target: str) -> "type[CompileOptions]":
    """The options class ``target`` takes: a built-in target's from :mod:`mexc.backends.options` (no backend is
    imported: the CLI judges flags with it before torch loads), a plugin's from its backend's ``options``
    attribute (importing the plugin). Raises like :func:`get_backend` for an unknown or broken target."""
    from .options import BUILTIN as BUILTIN_OPTIONS, CompileOptions

    if target in BUILTIN_OPTIONS:
        return BUILTIN_OPTIONS[target]
    cls = getattr(get_backend(target), "options", CompileOptions)
    if not (isinstance(cls, type) and issubclass(cls, CompileOptions)):
        raise BackendError(f"the {target} backend declares options={cls!r}, not a subclass of CompileOptions",
                           hint=f"fix or uninstall the package that declares {target} ({GROUP}): its options "
                                "must be a dataclass deriving from mexc.backends.options.CompileOptions")
    return cls
