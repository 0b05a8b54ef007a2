"""IR param -> Hugging Face tensor name, gathered from the family files (``families/<class>.py``, one row per
line in the dialect of :mod:`mexc.backends.lowering`).

Every IR param must be written by exactly one active row: ``check`` refuses a model with a param no row takes,
so no weight is ever dropped silently.
"""

from __future__ import annotations

from ..lowering import Row as Rule
from .families import REGISTRY

RULES: list[Rule] = [r for cls in REGISTRY for r in cls.rows]
FAMILIES = tuple(cls.name for cls in REGISTRY)


def rules_for(family: str) -> list[Rule]:
    return list(REGISTRY[family].rows)


def describe(family: str | None = None) -> str:
    """The name table as text: one line per row (all families, or one)."""
    out = []
    for fam in [family] if family else FAMILIES:
        out.append(f"[{fam}]")
        for r in rules_for(fam):
            extra = "" if (r.transform, r.when) == ("copy", "always") else f"  ({r.transform}, {r.when})"
            out.append(f"  {r.role + '.' + '+'.join(r.params):34s} -> {r.name}{extra}")
    return "\n".join(out)


__all__ = ["FAMILIES", "RULES", "Rule", "describe", "rules_for"]
