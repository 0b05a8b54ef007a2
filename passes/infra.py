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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

from ..errors import MexcError, PassError
from ..ir import Model


@dataclass
class PassResult:
    """What a pass did: ``modified`` is False when there was nothing to do; ``stats`` counts its rewrites;
    ``pinned``: ``(node, param name)`` pairs whose dtype the pass chose, changed or already right (a target's
    legalization that changes one later is an error, :class:`~mexc.passes.instruments.ChoiceGuard`)."""

    modified: bool
    stats: dict[str, int] = field(default_factory=dict)
    pinned: list = field(default_factory=list)


class Pass:
    """Base class of all passes. Subclasses are ``@dataclass``es; their fields are the pass options.

    Override :meth:`run`; optionally :meth:`requires` / :meth:`ensures` (return a list of problems).
    Passes never read tensor data: they compose recipes (``ir.derive``) on params.
    """

    name: ClassVar[str] = ""
    runs_after: ClassVar[tuple[str, ...]] = ()   # passes that, when in the pipeline, must come before this one
    origin: ClassVar[str] = "user"               # "legalize" on the passes a target adds (instance attribute)

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

    if name == "legalize":
        raise PassError("'legalize' is reserved: in a pipeline it stands for the target's legalization",
                        hint="pick another name for your pass")
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


_LOADED: dict[Path, list[str]] = {}


def load_pass_file(path: str | Path) -> list[str]:
    """Import a user file that registers passes; returns the names it added (a file already loaded in this
    process is not run again: its passes are registered)."""
    path = Path(path)
    if not path.is_file():
        raise PassError(f"pass file {path} does not exist", hint="give --load the path of a .py file")
    if path.resolve() in _LOADED and all(n in PASSES for n in _LOADED[path.resolve()]):
        return list(_LOADED[path.resolve()])
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
    _LOADED[path.resolve()] = sorted(set(PASSES) - before)
    return list(_LOADED[path.resolve()])


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
    """Runs passes in order. Around each pass its :mod:`instruments <mexc.passes.instruments>` run:
    ``verify_each`` (on by default), ``print_ir_after``, ``dump_ir``, ``log`` and the :class:`ChoiceGuard` are
    shorthands that add the built-in ones; ``instruments`` adds your own.

    Before anything runs, each pass's declared ``runs_after`` is checked against the order (a pipeline that
    places a pass before one it declares it must follow is refused)."""

    passes: list[Pass]
    verify_each: bool = True
    print_ir_after: set[str] = field(default_factory=set)  # pass names, or {"all"}
    dump_ir: Path | None = None
    log: Callable[[str], None] | None = None
    instruments: list = field(default_factory=list)
    results: list[tuple[str, PassResult]] = field(default_factory=list)

    def __post_init__(self):
        from . import instruments as ins

        built = [ins.VerifyEach()] if self.verify_each else []
        built.append(ins.ChoiceGuard())
        if self.log:
            built.append(ins.LogResults(self.log))
        if self.print_ir_after:
            built.append(ins.PrintIRAfter(set(self.print_ir_after)))
        if self.dump_ir is not None:
            built.append(ins.DumpIR(Path(self.dump_ir)))
        self.instruments = built + list(self.instruments)

    def __call__(self, model: Model) -> Model:
        from .instruments import where

        check_order(self.passes)
        for ins in self.instruments:
            ins.before_pipeline(model)
        done: list[str] = []
        for p in self.passes:
            ctx = where(p, done)
            for ins in self.instruments:
                ins.before_pass(p, model, done)
            pre = p.requires(model)
            if pre:
                raise PassError(f"{ctx}: precondition failed: " + "; ".join(pre),
                                hint=_hint_for(p, pre))
            t = time.perf_counter()
            try:
                result = p.run(model)
            except MexcError as e:
                raise PassError(f"{ctx} failed: {e.message}", hint=e.hint or _hint_for(p, [])) from e
            except Exception as e:
                raise PassError(f"{ctx} crashed: {type(e).__name__}: {e}",
                                hint="this is a bug in the pass; --debug shows the traceback") from e
            seconds = time.perf_counter() - t
            if not isinstance(result, PassResult):
                raise PassError(f"{ctx} returned {type(result).__name__}, not PassResult")
            post = p.ensures(model)
            if post:
                raise PassError(f"{ctx}: postcondition failed: " + "; ".join(post))
            for ins in self.instruments:
                ins.after_pass(p, model, done, result, seconds)
            done.append(p.name)
            self.results.append((p.name, result))
        for ins in self.instruments:
            ins.after_pipeline(model)
        return model


def check_order(passes: list[Pass]) -> None:
    """Each pass's ``runs_after`` names must come earlier in ``passes`` when they are in it at all."""
    for i, p in enumerate(passes):
        later = {q.name for q in passes[i + 1:]}
        for need in getattr(p, "runs_after", ()):
            if need in later:
                raise PassError(f"pass '{p.name}' must run after '{need}' (it declares runs_after), but the "
                                "pipeline places it before", hint=f"move {need} before {p.name} in --pipeline")


def _hint_for(p: Pass, problems: list[str]) -> str:
    return f"see `mexc passes {p.name}` for what this pass needs"


__all__ = ["Pass", "PassResult", "PassManager", "PASSES", "register_pass", "load_pass_file",
           "load_entry_point_passes", "check_order"]
