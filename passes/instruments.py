"""Pass instruments: what the :class:`~mexc.passes.PassManager` does around each pass, as separate objects
(MLIR's ``PassInstrumentation``: ``runBeforePass`` / ``runAfterPass``; LLVM's new-PM instrumentation callbacks).

Built in: :class:`VerifyEach` (the IR verifier after every pass), :class:`PrintIRAfter` (``--print-ir-after``),
:class:`DumpIR` (``--dump-ir``), :class:`LogResults` (one line per pass with its stats and seconds),
:class:`ChoiceGuard` (a pass that undoes an explicit dtype choice of a user pass is an error) and
:class:`SemanticCheck` (the reference interpreter before and after each pass: a pass that changes the logits more
than its dtype allows is an error). Write your own by subclassing :class:`Instrument` and passing it in
``PassManager(passes, instruments=[...])``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..errors import IRError, PassError
from ..ir import DType, Model, print_model, verify

if TYPE_CHECKING:
    from .infra import Pass, PassResult

USER, LEGALIZE = "user", "legalize"   # Pass.origin: who put the pass in the pipeline
_LOSSY = ("lower-dtype", "quantize")   # passes that round weights on purpose (SemanticCheck's looser bound)


def origin(p: "Pass") -> str:
    """``"user"`` (``--pipeline``, ``--vocab-size``) or ``"legalize"`` (the target's legalization)."""
    return getattr(p, "origin", USER)


def where(p: "Pass", done: list[str]) -> str:
    """``pass 'NAME{opts}' (after a, b)``: how errors name a pass and its place in the pipeline."""
    return f"pass '{p}'" + (f" (after {', '.join(done)})" if done else " (the first pass)")


class Instrument:
    """Hooks around a pipeline; each may raise a :class:`~mexc.errors.PassError` that stops it."""

    def before_pipeline(self, model: Model) -> None: ...

    def before_pass(self, p: "Pass", model: Model, done: list[str]) -> None: ...

    def after_pass(self, p: "Pass", model: Model, done: list[str], result: "PassResult", seconds: float) -> None:
        ...

    def after_pipeline(self, model: Model) -> None: ...


class VerifyEach(Instrument):
    """The IR verifier on the input and after every pass (errors name the pass that broke the invariant)."""

    def before_pipeline(self, model):
        try:
            verify(model)
        except IRError as e:
            raise IRError("the input IR is invalid before any pass ran: " + e.message, hint=e.hint) from e

    def after_pass(self, p, model, done, result, seconds):
        try:
            verify(model)
        except IRError as e:
            before = f" (after {', '.join(done)})" if done else ""
            raise PassError(f"IR verification failed after pass '{p}'{before}: {e.message}",
                            hint="the pass broke an IR invariant; fix the pass or run with --print-ir-after="
                                 f"{p.name}") from e


@dataclass
class PrintIRAfter(Instrument):
    """The IR as text on stderr after the named passes (``{"all"}``: every pass)."""

    names: set[str]

    def after_pass(self, p, model, done, result, seconds):
        if "all" in self.names or p.name in self.names:
            sys.stderr.write(f"// ----- IR after {p} -----\n{print_model(model)}")


@dataclass
class DumpIR(Instrument):
    """``DIR/00-input.mlir.txt`` and ``DIR/NN-<pass>.mlir.txt`` after each pass."""

    directory: Path
    _i: int = 0

    def before_pipeline(self, model):
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "00-input.mlir.txt").write_text(print_model(model))

    def after_pass(self, p, model, done, result, seconds):
        self._i += 1
        (self.directory / f"{self._i:02d}-{p.name}.mlir.txt").write_text(print_model(model))


@dataclass
class LogResults(Instrument):
    """``NAME: modified (stat=n, ...) in 0.01s`` per pass through ``log``; ``seconds`` keeps the timings."""

    log: Callable[[str], None]
    seconds: list[tuple[str, float]] = field(default_factory=list)

    def after_pass(self, p, model, done, result, seconds):
        self.seconds.append((p.name, seconds))
        stats = ", ".join(f"{k}={v}" for k, v in result.stats.items())
        self.log(f"{p.name}: {'modified' if result.modified else 'no change'}{' (' + stats + ')' if stats else ''}"
                 f" in {seconds:.2f}s")


class ChoiceGuard(Instrument):
    """A legalization pass that changes the dtype of a param a user pass had set or pinned (``PassResult.pinned``:
    ``keep-norms-fp32`` undone by the target's ``lower-dtype`` for ``--dtype bfloat16``) stops the pipeline: the output would silently not be
    what the user asked. The fix is to place the user pass after the legalization (``legalize`` in
    ``--pipeline``)."""

    def __init__(self):
        self.chosen: dict[tuple[int, str], str] = {}   # (id(node), param) -> the user pass that set its dtype
        self._before: dict[tuple[int, str], object] = {}
        self._where: dict[tuple[int, str], tuple] = {}

    def _dtypes(self, model):
        out = {}
        for node, name, prm in model.graph.params():
            out[(id(node), name)] = prm.type.dtype
            self._where[(id(node), name)] = (node, name)
        return out

    def before_pass(self, p, model, done):
        self._before = self._dtypes(model)

    def after_pass(self, p, model, done, result, seconds):
        changed = [k for k, d in self._dtypes(model).items() if k in self._before and self._before[k] != d]
        if origin(p) == USER:
            self.chosen.update({k: str(p) for k in changed})
            self.chosen.update({(id(node), name): str(p) for node, name in result.pinned})
            return
        undone = [k for k in changed if k in self.chosen]
        if undone:
            first = self.chosen[undone[0]]
            raise PassError(f"{where(p, done)}, part of the target's legalization, changed the dtype of "
                            f"{len(undone)} param(s) that the user pass '{first}' had set (e.g. "
                            f"{self._where[undone[0]][0].location}: {self._where[undone[0]][1]}): its choice "
                            "would be silently undone",
                            hint=f"place it after the legalization: --pipeline '...,legalize,{first}'")


@dataclass
class SemanticCheck(Instrument):
    """Runs the reference interpreter (:mod:`mexc.ir.interpreter`) on ``tokens`` before the pipeline and after
    every pass; a pass whose logits differ from the previous ones by more than ``tol`` (relative to the logits'
    largest magnitude; looser after a pass that lowered the dtype or quantized, per the model's dtype) is an
    error naming it. Materializes every weight: for small models and debugging (``--check-semantics``)."""

    tokens: object = None            # [b, s] int64; default: 2 x 8 ids below the vocab size
    tol: float = 1e-4
    log: Callable[[str], None] | None = None
    checked: list[tuple[str, float]] = field(default_factory=list)
    _last: object = None

    def _logits(self, model):
        import torch

        from ..ir.interpreter import run

        if self.tokens is None:
            g = torch.Generator().manual_seed(0)
            self.tokens = torch.randint(0, model.config.vocab_size, (2, 8), generator=g)
        return run(model, self.tokens, trim_vocab=True).float()

    def before_pipeline(self, model):
        self._last = self._logits(model)

    def after_pass(self, p, model, done, result, seconds):
        if not result.modified:
            return
        got = self._logits(model)
        scale = max(self._last.abs().max().item(), 1e-6)
        err = (got - self._last).abs().max().item() / scale
        lossy = model.config.dtype != DType.f32 or p.name in _LOSSY
        bound = 5e-2 if lossy else self.tol
        self.checked.append((str(p), err))
        if got.shape != self._last.shape or not err <= bound:
            raise PassError(f"{where(p, done)} changed the model's logits: max relative difference {err:.3g} "
                            f"(bound {bound:g}) on the reference interpreter",
                            hint="the pass is not semantics-preserving; --print-ir-after shows what it did")
        self._last = got

    def after_pipeline(self, model):
        if self.log:
            worst = max((e for _, e in self.checked), default=0.0)
            self.log(f"semantic check: logits kept by {len(self.checked)} modifying pass(es), largest relative "
                     f"difference {worst:.2g}")

