"""MLIR-style textual pipelines: ``relayout-qkv{to=concat},reshard{tp=2 pp=1},lower-dtype{to=bf16}``.

``parse_pipeline`` builds pass instances (options checked against the dataclass fields and their types);
``format_pipeline`` writes the fully expanded form (every option, defaults included), which parses back to
equal passes, so any build can be reproduced from the pipeline recorded in its output.
"""

from __future__ import annotations

import dataclasses
import re
import typing

from ..errors import ParseError
from .infra import PASSES, Pass

_ITEM = re.compile(r"\s*(?P<name>[a-z][a-z0-9-]*)\s*(?:\{(?P<opts>[^{}]*)\})?\s*")
_OPT = re.compile(r"(?P<k>[a-z_][a-z0-9_-]*)\s*=\s*(?P<v>\"[^\"]*\"|[^\s,]+)")


def _coerce(cls: type, field: dataclasses.Field, raw: str):
    hints = typing.get_type_hints(cls)
    t = hints.get(field.name, str)
    origin = typing.get_origin(t)
    args = [a for a in typing.get_args(t) if a is not type(None)]
    if raw in ("none", "None") and type(None) in typing.get_args(t):
        return None
    if origin is typing.Union or origin is getattr(__import__("types"), "UnionType", None):
        t = args[0] if args else str
        origin = typing.get_origin(t)
    if origin is typing.Literal:
        allowed = typing.get_args(t)
        if raw not in allowed:
            raise ValueError(f"must be one of {', '.join(map(str, allowed))}")
        return raw
    if origin in (tuple, list):
        parts = [p for p in raw.strip('"').strip("()[]").split(":") if p] if raw else []
        return tuple(parts)
    if t is bool:
        if raw.lower() in ("true", "1", "yes", "on"):
            return True
        if raw.lower() in ("false", "0", "no", "off"):
            return False
        raise ValueError("must be true or false")
    if t is int:
        return int(raw)
    if t is float:
        return float(raw)
    return raw.strip('"')


LEGALIZE = "legalize"
"""The reserved pipeline item that stands for the target's legalization passes (``mexc compile --pipeline
'a,legalize,b'``: a before, b after them; without it the legalization comes last)."""


class Marker(str):
    """A reserved item in a parsed pipeline (:data:`LEGALIZE`), replaced by the driver."""


def parse_pipeline(text: str, markers: tuple[str, ...] = ()) -> list[Pass]:
    """Parse pipeline text into pass instances; errors name the item and list what is allowed.

    ``markers``: reserved items this caller splices (``("legalize",)`` for compile); they come back as
    :class:`Marker` strings in the list. Elsewhere ``legalize`` is refused with the reason."""
    passes: list[Pass] = []
    text = text.strip()
    if not text:
        return passes
    pos = 0
    while pos < len(text):
        m = _ITEM.match(text, pos)
        if not m or m.end() == pos:
            raise ParseError(f"malformed pipeline at column {pos + 1}: {text[pos:pos + 30]!r}",
                             hint="write NAME or NAME{key=value key=value}, items separated by commas")
        name = m["name"]
        if name == LEGALIZE:
            if name not in markers:
                raise ParseError("`legalize` places the target's legalization in a pipeline; only "
                                 "`mexc compile --pipeline` has a target", hint="drop `legalize` here")
            if m["opts"] is not None or name in passes:
                raise ParseError("`legalize` takes no options and appears at most once",
                                 hint="write ...,legalize,...")
            passes.append(Marker(name))
            pos = m.end()
            if pos < len(text):
                if text[pos] != ",":
                    raise ParseError(f"expected ',' at column {pos + 1} of pipeline {text!r}",
                                     hint="separate passes with commas: a,legalize,b")
                pos += 1
            continue
        if name not in PASSES:
            raise ParseError(f"unknown pass {name!r} in pipeline",
                             hint=f"`mexc passes` lists them: {', '.join(sorted(PASSES))}")
        cls = PASSES[name]
        fields = {f.name.replace("_", "-"): f for f in dataclasses.fields(cls)}
        kwargs = {}
        opts = m["opts"] or ""
        consumed = _OPT.sub("", opts).replace(",", " ").strip()
        if consumed:
            raise ParseError(f"pass {name}: cannot read options {opts!r}", hint="write {key=value key=value}")
        for om in _OPT.finditer(opts):
            key = om["k"].replace("_", "-")
            if key not in fields:
                raise ParseError(f"pass {name} has no option {key!r}",
                                 hint=f"its options: {', '.join(fields) or '(none)'}")
            try:
                kwargs[fields[key].name] = _coerce(cls, fields[key], om["v"])
            except ValueError as e:
                raise ParseError(f"pass {name}: option {key}={om['v']}: {e}",
                                 hint=f"`mexc passes {name}` shows the option types") from None
        try:
            passes.append(cls(**kwargs))
        except ParseError:
            raise
        except Exception as e:
            raise ParseError(f"pass {name}: {e}", hint=f"`mexc passes {name}` shows the options") from None
        pos = m.end()
        if pos < len(text):
            if text[pos] == "{":
                raise ParseError(f"malformed pipeline: unclosed '{{' at column {pos + 1} of {text!r}",
                                 hint="write NAME{key=value key=value}")
            if text[pos] != ",":
                raise ParseError(f"expected ',' at column {pos + 1} of pipeline {text!r}",
                                 hint="separate passes with commas: a,b{k=v},c")
            pos += 1
    return passes


def _fmt_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "none"
    if isinstance(v, (tuple, list)):
        return ":".join(map(str, v)) or '""'
    s = str(v)
    return f'"{s}"' if (not s or re.search(r"[\s,{}=]", s)) else s


def format_pass(p: Pass) -> str:
    opts = " ".join(f"{k.replace('_', '-')}={_fmt_value(v)}" for k, v in p.option_values().items())
    return f"{p.name}{{{opts}}}" if opts else p.name


def format_pipeline(passes: list[Pass]) -> str:
    return ",".join(format_pass(p) for p in passes)
