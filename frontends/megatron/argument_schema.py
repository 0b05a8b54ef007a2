"""What a row of the Megatron argument table (:mod:`.arguments`) is: :class:`Arg`, its three verdicts, the
row builders ``H`` (honoured), ``R`` (refused) and ``I`` (irrelevant), and the megatron-core releases that
define an argument name (:mod:`.argument_versions`). Split from :mod:`.arguments`, which holds the rows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .argument_versions import RELEASES, SPANS

HONOURED, REFUSED, IRRELEVANT = "honoured", "refused", "irrelevant"


@dataclass(frozen=True)
class Arg:
    """One row: an argument, its default and mexc's verdict."""

    name: str
    default: Any
    verdict: str
    by: str = ""                     # honoured: IR attribute / ModelConfig field; irrelevant: why
    fix: str = ""                    # refused: what the user can do
    field: str | None = None         # the MegatronArch field (config.ARG_ALIASES) this argument feeds
    aliases: tuple[str, ...] = ()    # older / TransformerConfig / NeMo names of the same setting
    values: tuple | None = None      # honoured: the values honoured (None: all)
    ok: tuple = ()                   # refused: values besides the default that are harmless
    when: str | None = None          # judged only when this other argument is set (not at its default)
    judge: Any = None                # honoured: value -> why it is not honoured (str) or None, for open value sets

    def at_default(self, v: Any) -> bool:
        """True when ``v`` means the same as the default (None / False / 0 / empty count as unset when the
        default is unset)."""
        unset = (None, False, 0, (), [], "")
        if _eq(v, self.default) or any(_eq(v, o) for o in self.ok):
            return True
        return self.default in (None, False) and any(_eq(v, u) for u in unset)

    def problem(self, v: Any) -> str | None:
        """Why value ``v`` stops the lift, or None."""
        if self.verdict == REFUSED and not self.at_default(v):
            return f"{self.name}={_show(v)} ({self.fix})"
        if self.verdict == HONOURED and self.judge is not None and not self.at_default(v) and self.judge(v):
            return f"{self.name}={_show(v)} ({self.judge(v)})"
        if self.verdict == HONOURED and self.values is not None and not self.at_default(v) and \
                not any(_eq(v, o) for o in self.values):
            return (f"{self.name}={_show(v)} (mexc honours {', '.join(_show(o) for o in self.values)}; "
                    f"{self.fix or 'other values are not supported yet'})")
        return None

    @property
    def versions(self) -> str:
        """megatron-core releases whose Megatron-LM defines this argument (or an alias), e.g. ``0.9-0.19``."""
        return release_span(self.name, *self.aliases)


def _eq(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):   # True == 1 in Python; a switch is not a count
        return type(a) is type(b) and a == b
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - values without a truth value (arrays) compare as different
        return False


def _show(v: Any) -> str:
    s = repr(v) if not isinstance(v, str) else v
    return s if len(s) <= 60 else s[:57] + "..."


def H(name, default, by, field=None, aliases=(), values=None, fix="", judge=None):  # noqa: N802 - row builders
    return Arg(name, default, HONOURED, by, fix, field, tuple(aliases), values, judge=judge)


def window_problem(v) -> str | None:
    """megatron-core's window_size (left, right): mexc honours (L, 0), L >= 0 (see config._window)."""
    if isinstance(v, str):
        v = [p.strip() for p in v.strip("()[] ").split(",")]
        v = [int(p) if p.lstrip("-").isdigit() else p for p in v]
    ok = isinstance(v, (tuple, list)) and len(v) == 2 and all(type(x) is int for x in v) and v[0] >= 0 and v[1] == 0
    return None if ok else ("mexc honours (L, 0) with L >= 0: keys i-L..i; a right window lets a query see later "
                            "tokens, which no causal decoder target expresses, and -1 is unbounded to Transformer "
                            "Engine but an empty window to megatron-core's local attention")


def R(name, default, fix, aliases=(), ok=(), when=None):  # noqa: N802
    return Arg(name, default, REFUSED, fix=fix, aliases=tuple(aliases), ok=tuple(ok), when=when)


def I(name, default, why, field=None, aliases=()):  # noqa: N802, E743
    return Arg(name, default, IRRELEVANT, why, field=field, aliases=tuple(aliases))


_SPAN_OF: dict[str, str] = {n: span for span, names in SPANS.items() for n in names.split()}


def release_span(*names: str) -> str:
    """The megatron-core releases whose Megatron-LM defines any of ``names`` ("" when none does)."""
    spans = [_SPAN_OF[n] for n in names if n in _SPAN_OF]
    if not spans:
        return ""
    idx = sorted({i for s in spans for part in s.split(",") for i in _span_indices(part)})
    runs, start = [], idx[0]
    for a, b in zip(idx, idx[1:] + [None]):
        if b != a + 1:
            runs.append(RELEASES[a] if start == a else f"{RELEASES[start]}-{RELEASES[a]}")
            start = b
    return ",".join(runs)


def _span_indices(part: str) -> range:
    lo, _, hi = part.partition("-")
    return range(RELEASES.index(lo), RELEASES.index(hi or lo) + 1)
