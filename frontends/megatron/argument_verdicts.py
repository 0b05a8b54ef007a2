"""The Megatron argument table (:mod:`.arguments`) applied to one checkpoint's saved args: the verdict of every
argument (:func:`apply`), the lift's refusal (:func:`refuse`) and ``mexc inspect --args`` (:func:`describe`).
Split from :mod:`.arguments`, which re-exports these names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...errors import ConfigError
from .argument_schema import IRRELEVANT, REFUSED, Arg, _show
from .arguments import BY_NAME, CATEGORIES, ROWS, lookup


def _items(args: Any) -> list[tuple[str, Any]]:
    d = args if isinstance(args, dict) else vars(args) if hasattr(args, "__dict__") else {}
    return sorted(d.items())


@dataclass(frozen=True)
class Verdicts:
    """The table applied to one checkpoint's args."""

    rows: tuple[tuple[str, Any, Arg | None], ...]   # (name, saved value, row or None when unknown)

    def problems_except(self, overridden=frozenset()) -> list[str]:
        """What stops the lift, leaving out rows whose field the user overrode (--config / --set) and rows
        whose ``when`` argument is unset (Megatron reads window_attn_skip_freq only with a window)."""
        values = {n: v for n, v, _ in self.rows}
        return [p for n, v, r in self.rows if r is not None and r.field not in overridden
                and (r.when is None or not BY_NAME[r.when].at_default(values.get(r.when)))
                for p in [r.problem(v)] if p]

    @property
    def problems(self) -> list[str]:
        return self.problems_except()

    @property
    def unknown(self) -> list[str]:
        return [n for n, _, r in self.rows if r is None]


def apply(args: Any) -> Verdicts:
    """Look up every saved argument."""
    return Verdicts(tuple((n, v, lookup(n)) for n, v in _items(args)))


def refuse(args: Any, where: str, overridden=frozenset()) -> Verdicts:
    """Raise :class:`ConfigError` naming every saved argument that changes the math and is not honoured
    (``overridden``: MegatronArch fields the user set, whose saved arguments are not judged)."""
    v = apply(args)
    problems = v.problems_except(overridden)
    if problems:
        raise ConfigError(f"{where}: the saved args set what mexc cannot express: " + "; ".join(problems),
                          hint="mexc never drops a setting that changes the model's math; `mexc inspect "
                            "--args "
                               "CKPT` prints every argument's verdict (docs/arguments.md)")
    return v


def status(r: Arg | None, value: Any, values: dict | None = None) -> str:
    """What one saved value amounts to: REFUSED, honoured, default (a refused/honoured row at its default, or
    one whose ``when`` argument is unset in ``values``), irrelevant or UNKNOWN."""
    if r is None:
        return "UNKNOWN"
    if r.when and values is not None and BY_NAME[r.when].at_default(values.get(r.when)):
        return "default"
    if r.problem(value):
        return "REFUSED"
    return "default" if r.verdict != IRRELEVANT and r.at_default(value) else r.verdict


def describe(args: Any | None = None) -> str:
    """The table as text: every row (``args`` None), or the verdict for each argument of one checkpoint."""
    lines = []
    if args is None:
        for r in sorted(ROWS, key=lambda r: r.name):
            extra = r.fix if r.verdict == REFUSED else r.by
            names = r.name + (f" ({', '.join(r.aliases)})" if r.aliases else "")
            lines.append(f"{r.verdict:10s} {names:58s} default={_show(r.default):12s} "
                         f"[{r.versions or 'config'}] {extra}")
        lines.append("irrelevant every other Megatron-LM argument, by category: "
                     + "; ".join(why for _, why in CATEGORIES))
        return "\n".join(lines)
    rows = apply(args).rows
    values = {n: v for n, v, _ in rows}
    for name, value, r in rows:
        if r is None:
            lines.append(f"{'UNKNOWN':10s} {name:48s} = {_show(value)}")
            continue
        verdict = status(r, value, values)
        problem = r.problem(value) if verdict == "REFUSED" else None
        note = problem or r.by or (f"refused when set: {r.fix}" if r.fix else "")
        lines.append(f"{verdict:10s} {name:48s} = {_show(value):14s} {note}")
    return "\n".join(lines)
