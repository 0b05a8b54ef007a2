"""The textual IR: ``print_model`` writes it, ``parse`` reads it back to an equal model.

Example::

    mexc.model(family="llama", hidden_size=64, num_layers=2, vocab_size=100, max_position_embeddings=32, dtype="f32")
    parallel(tp=1, pp=1, ep=1)
    meta(format="torch", iteration=10)
    store ckpt = megatron-torch(root="/data/ckpt/iter_0000010", ...)
    %0 = embedding(%input_ids) stage=0 {scale=1.0}
        word: f32[128,64] replicated = load(ckpt, "mp_rank_00:embedding.word_embeddings.weight", type="f32[128,64]")
    %1 = norm(%0) layer=0 stage=0 {kind="rmsnorm", eps=1e-05, zero_centered=False}
        weight: f32[64] replicated = load(ckpt, "mp_rank_00:decoder.layers.0.input_layernorm.weight", ...)
    ...
    return %9

Expressions (attribute values, recipes, headers) use Python call syntax and are read with :mod:`ast`
(literals only; no evaluation), so the form is easy to diff, grep and edit by hand.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from typing import Any

from ..errors import ParseError
from .graph import Graph, Model, Node, Param, Value
from .tensors import STORE_KINDS, Recipe, Store, derive, load
from .types import DType, ModelConfig, Parallelism, Rope, Sharding, TensorType

_VALUE_TYPES = {"Rope": Rope}

# ----------------------------------------------------------------------------------------- printing


def _lit(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return repr(v)
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, (int, str)):
        return repr(v) if isinstance(v, int) else _str(v)
    if isinstance(v, DType):
        return _str(v.value)
    if isinstance(v, (tuple, list)):
        inner = ", ".join(_lit(x) for x in v)
        return f"({inner},)" if isinstance(v, tuple) and len(v) == 1 else (f"({inner})" if isinstance(v, tuple) else f"[{inner}]")
    if dataclasses.is_dataclass(v):
        fields = [f"{f.name}={_lit(getattr(v, f.name))}" for f in dataclasses.fields(v)
                  if getattr(v, f.name) != f.default]
        return f"{type(v).__name__}({', '.join(fields)})"
    raise TypeError(f"cannot print attribute value {v!r}")


def _str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _kwargs(d: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_lit(v)}" for k, v in d.items())


def format_recipe(r: Recipe) -> str:
    if r.op == "load":
        return f"load({r.store.name}, {_str(r.attrs['key'])}, type={_str(str(r.type))})"
    args = [format_recipe(i) for i in r.inputs]
    args += [f"{k}={_lit(v)}" for k, v in r.attrs.items()]
    return f"{r.op}({', '.join(args)})"


def print_model(model: Model) -> str:
    c = model.config
    lines = [
        f"mexc.model(family={_str(c.family)}, hidden_size={c.hidden_size}, num_layers={c.num_layers}, "
        f"vocab_size={c.vocab_size}, max_position_embeddings={c.max_position_embeddings}, "
        f"dtype={_str(c.dtype.value)}" + (f", extra={_lit(c.extra)}" if c.extra else "") + ")",
        f"parallel(tp={model.parallel.tp}, pp={model.parallel.pp}, ep={model.parallel.ep})",
    ]
    if model.meta:
        lines.append(f"meta({_kwargs(dict(sorted(model.meta.items())))})")
    for name, store in sorted(model.stores.items()):
        lines.append(f"store {name} = {store.kind}({_kwargs(store.spec())})")
    names: dict[int, str] = {id(v): f"%{v.name}" for v in model.graph.inputs}
    for i, n in enumerate(model.graph.nodes):
        names[id(n.output)] = f"%{i}"
        ins = ", ".join(names.get(id(v), "%<undefined>") for v in n.inputs)
        where = (f" layer={n.layer}" if n.layer is not None else "") + f" stage={n.stage}"
        attrs = f" {{{_kwargs(n.attrs)}}}" if n.attrs else ""
        lines.append(f"%{i} = {n.op}({ins}){where}{attrs}")
        for k, p in n.params.items():
            lines.append(f"    {k}: {p.type} {p.sharding} = {format_recipe(p.source)}")
    lines.append("return " + ", ".join(names.get(id(v), "%<undefined>") for v in model.graph.outputs))
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------- parsing


class _Reader:
    def __init__(self, stores: dict[str, Store], lineno: int):
        self.stores = stores
        self.lineno = lineno

    def err(self, msg: str) -> ParseError:
        return ParseError(f"line {self.lineno}: {msg}", hint="compare with the output of `mexc inspect --ir`")

    def lit(self, node: ast.AST) -> Any:
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Tuple):
            return tuple(self.lit(e) for e in node.elts)
        if isinstance(node, ast.List):
            return [self.lit(e) for e in node.elts]
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -self.lit(node.operand)
        if isinstance(node, ast.Name) and node.id in ("true", "false", "null"):
            return {"true": True, "false": False, "null": None}[node.id]
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _VALUE_TYPES:
            return _VALUE_TYPES[node.func.id](**{k.arg: self.lit(k.value) for k in node.keywords})
        raise self.err(f"expected a literal, got {ast.unparse(node)!r}")

    def recipe(self, node: ast.AST) -> Recipe:
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
            raise self.err(f"expected a recipe call, got {ast.unparse(node)!r}")
        op = node.func.id
        kw = {k.arg: self.lit(k.value) for k in node.keywords}
        if op == "load":
            if len(node.args) != 2 or not isinstance(node.args[0], ast.Name):
                raise self.err("load(STORE, KEY, type=TYPE) expected")
            store = node.args[0].id
            if store not in self.stores:
                raise self.err(f"unknown store {store!r}; declare it with `store {store} = KIND(...)`")
            return load(self.stores[store], self.lit(node.args[1]), TensorType.parse(kw["type"]))
        try:
            return derive(op, *[self.recipe(a) for a in node.args], **kw)
        except ParseError:
            raise
        except Exception as e:  # type errors of the recipe op
            raise self.err(f"{op}: {e}") from None

    def expr(self, text: str) -> ast.expr:
        try:
            return ast.parse(text.strip(), mode="eval").body
        except SyntaxError as e:
            raise self.err(f"cannot parse {text.strip()!r}: {e.msg}") from None


_NODE_RE = re.compile(r"^%(?P<id>\w+) = (?P<op>\w+)\((?P<ins>[^)]*)\)(?P<where>(?: \w+=\d+)*)(?: \{(?P<attrs>.*)\})?$")
_PARAM_RE = re.compile(r"^\s+(?P<name>\w+): (?P<type>.+?) (?P<shard>replicated(?:\(\w+=\d+\))?|split\([^)]*\)) = (?P<recipe>.+)$")
_STORE_RE = re.compile(r"^store (?P<name>\w+) = (?P<kind>[\w-]+)\((?P<kw>.*)\)$")


def parse(text: str) -> Model:
    """Read the text form back into a :class:`Model` (``print_model(parse(t)) == t`` for printed ``t``)."""
    stores: dict[str, Store] = {}
    config = None
    parallel = Parallelism()
    meta: dict[str, Any] = {}
    graph = Graph()
    values: dict[str, Value] = {"%input_ids": graph.inputs[0]}
    node: Node | None = None
    for lineno, line in enumerate(text.splitlines(), 1):
        rd = _Reader(stores, lineno)
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line.startswith("mexc.model("):
            kw = _call_kwargs(rd, line[len("mexc."):])
            kw["dtype"] = DType.parse(kw.get("dtype", "f32"))
            if "extra" in kw:
                kw["extra"] = tuple(tuple(x) for x in kw["extra"])
            config = ModelConfig(**kw)
        elif line.startswith("parallel("):
            parallel = Parallelism(**_call_kwargs(rd, line))
        elif line.startswith("meta("):
            meta = _call_kwargs(rd, line)
        elif m := _STORE_RE.match(line):
            if m["kind"] not in STORE_KINDS:
                raise rd.err(f"unknown store kind {m['kind']!r} (known: {', '.join(sorted(STORE_KINDS))})")
            kw = _call_kwargs(rd, f"f({m['kw']})")
            stores[m["name"]] = STORE_KINDS[m["kind"]](m["name"], **kw)
        elif m := _NODE_RE.match(line):
            ins = []
            for name in filter(None, (s.strip() for s in m["ins"].split(","))):
                if name not in values:
                    raise rd.err(f"value {name} used before it is defined")
                ins.append(values[name])
            where = dict(kv.split("=") for kv in m["where"].split())
            attrs = _call_kwargs(rd, f"f({m['attrs'] or ''})")
            node = Node(m["op"], ins, attrs, layer=int(where["layer"]) if "layer" in where else None,
                        stage=int(where.get("stage", 0)))
            values[f"%{m['id']}"] = graph.append(node)
        elif m := _PARAM_RE.match(line):
            if node is None:
                raise rd.err("a param line must follow a node line")
            want = TensorType.parse(m["type"])
            src = rd.recipe(rd.expr(m["recipe"]))
            if src.type != want:
                raise rd.err(f"param {m['name']}: recipe has type {src.type}, the line says {want}")
            node.params[m["name"]] = Param(src, Sharding.parse(m["shard"]))
        elif line.startswith("return "):
            outs = [s.strip() for s in line[len("return "):].split(",")]
            for o in outs:
                if o not in values:
                    raise rd.err(f"return of undefined value {o}")
            graph.outputs = [values[o] for o in outs]
        else:
            raise rd.err(f"unrecognized line {line.strip()[:80]!r}")
    if config is None:
        raise ParseError("no `mexc.model(...)` header line", hint="the IR text starts with mexc.model(...)")
    return Model(config, graph, parallel, stores, meta)


def _call_kwargs(rd: _Reader, text: str) -> dict[str, Any]:
    e = rd.expr(text)
    if not isinstance(e, ast.Call) or e.args:
        raise rd.err(f"expected name(key=value, ...), got {text.strip()[:80]!r}")
    return {k.arg: rd.lit(k.value) for k in e.keywords}
