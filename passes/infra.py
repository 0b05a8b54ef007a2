"""Pass infrastructure: the Pass base class, PassResult, the registry and the PassManager.

A pass is a dataclass whose fields are its options. ``@register_pass("kebab-name")`` adds it to the registry
(duplicates are refused). :class:`PassManager` runs a pipeline: for each pass, ``requires`` (precondition),
``run``, ``ensures`` (postcondition) and the IR verifier; any failure becomes a :class:`PassError` that names
the pass, the passes before it, and the fix.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

from ..errors import IRError, MexcError, PassError
from ..ir import Model, print_model, verify


@dataclass
class PassResult:
    """What a pass did: ``modified`` is False when there was nothing to do; ``stats`` counts its rewrites."""

    modified: bool
    stats: dict[str, int] = field(default_factory=dict)


class Pass:
    """Base class of all passes. Subclasses are ``@dataclass``es; their fields are the pass options.

    Override :meth:`run`; optionally :meth:`requires` / :meth:`ensures` (return a list of problems).
    Passes never read tensor data: they compose recipes (``ir.derive``) on params.
    """

    name: ClassVar[str] = ""

    def requires(self, model: Model) -> list[str]:
        return []

    def run(self, model: Model) -> PassResult:
        raise NotImplementedError

    def ensures(self, model: Model) -> list[str]:
        return []

    @classmethod
    def summary(cls) -> str:
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""

    @classmethod
    def options(cls) -> list[dataclasses.Field]:
        return list(dataclasses.fields(cls)) if dataclasses.is_dataclass(cls) else []

    def option_values(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in self.options()}

    def __str__(self) -> str:
        from .pipeline import format_pass

        return format_pass(self)


PASSES: dict[str, type[Pass]] = {}

_KEBAB = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")


def register_pass(name: str) -> Callable[[type[Pass]], type[Pass]]:
    """Class decorator: register a pass under a kebab-case ``name`` (duplicates are an error)."""

    if not _KEBAB.match(name):
        raise PassError(f"pass name {name!r} is not kebab-case", hint="use lowercase words joined by '-'")

    def deco(cls: type[Pass]) -> type[Pass]:
        if name in PASSES and PASSES[name] is not cls:
            raise PassError(f"a pass named {name!r} is already registered ({PASSES[name].__module__})",
                            hint="pick another name for your pass")
        if not dataclasses.is_dataclass(cls):
            cls = dataclass(cls)
        cls.name = name
        PASSES[name] = cls
        return cls

    return deco


def load_pass_file(path: str | Path) -> list[str]:
    """Import a user file that registers passes; returns the names it added."""
    path = Path(path)
    if not path.is_file():
        raise PassError(f"pass file {path} does not exist", hint="give --load the path of a .py file")
    before = set(PASSES)
    spec = importlib.util.spec_from_file_location(f"mexc_user_pass_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    try:
        spec.loader.exec_module(mod)
    except MexcError:
        raise
    except Exception as e:
        raise PassError(f"loading pass file {path} failed: {type(e).__name__}: {e}",
                        hint="run the file with python to see the traceback") from e
    return sorted(set(PASSES) - before)


def load_entry_point_passes(group: str = "mexc.passes") -> list[str]:
    """Load passes that installed packages declare in the ``mexc.passes`` entry-point group."""
    from importlib.metadata import entry_points

    before = set(PASSES)
    for ep in entry_points(group=group):
        try:
            ep.load()
        except Exception as e:
            raise PassError(f"entry point {ep.name} = {ep.value} ({group}) failed to load: {e}",
                            hint="fix or uninstall the package that declares it") from e
    return sorted(set(PASSES) - before)


@dataclass
class PassManager:
    """Runs passes in order, verifying after each (on by default)."""

    passes: list[Pass]
    verify_each: bool = True
    print_ir_after: set[str] = field(default_factory=set)  # pass names, or {"all"}
    dump_ir: Path | None = None
    log: Callable[[str], None] | None = None
    results: list[tuple[str, PassResult]] = field(default_factory=list)

    def __call__(self, model: Model) -> Model:
        if self.verify_each:
            self._verify(model, None, [])
        if self.dump_ir is not None:
            self.dump_ir.mkdir(parents=True, exist_ok=True)
            (self.dump_ir / "00-input.mlir.txt").write_text(print_model(model))
        done: list[str] = []
        for i, p in enumerate(self.passes, 1):
            ctx = f"pass '{p}'" + (f" (after {', '.join(done)})" if done else " (the first pass)")
            pre = p.requires(model)
            if pre:
                raise PassError(f"{ctx}: precondition failed: " + "; ".join(pre),
                                hint=_hint_for(p, pre))
            try:
                result = p.run(model)
            except MexcError as e:
                raise PassError(f"{ctx} failed: {e.message}", hint=e.hint or _hint_for(p, [])) from e
            except Exception as e:
                raise PassError(f"{ctx} crashed: {type(e).__name__}: {e}",
                                hint="this is a bug in the pass; --debug shows the traceback") from e
            if not isinstance(result, PassResult):
                raise PassError(f"{ctx} returned {type(result).__name__}, not PassResult")
            post = p.ensures(model)
            if post:
                raise PassError(f"{ctx}: postcondition failed: " + "; ".join(post))
            if self.verify_each:
                self._verify(model, p, done)
            done.append(p.name)
            self.results.append((p.name, result))
            if self.log:
                stats = ", ".join(f"{k}={v}" for k, v in result.stats.items())
                self.log(f"{p.name}: {'modified' if result.modified else 'no change'}{' (' + stats + ')' if stats else ''}")
            if "all" in self.print_ir_after or p.name in self.print_ir_after:
                sys.stderr.write(f"// ----- IR after {p} -----\n{print_model(model)}")
            if self.dump_ir is not None:
                (self.dump_ir / f"{i:02d}-{p.name}.mlir.txt").write_text(print_model(model))
        return model

    def _verify(self, model: Model, p: Pass | None, done: list[str]):
        try:
            verify(model)
        except IRError as e:
            if p is None:
                raise IRError("the input IR is invalid before any pass ran: " + e.message, hint=e.hint) from e
            before = f" (after {', '.join(done)})" if done else ""
            raise PassError(f"IR verification failed after pass '{p}'{before}: {e.message}",
                            hint="the pass broke an IR invariant; fix the pass or run with --print-ir-after="
                                 f"{p.name}") from e


def _hint_for(p: Pass, problems: list[str]) -> str:
    return f"see `mexc passes {p.name}` for what this pass needs"


__all__ = ["Pass", "PassResult", "PassManager", "PASSES", "register_pass", "load_pass_file",
           "load_entry_point_passes"]
