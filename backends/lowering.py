"""The lowering layer every weight-file target shares: target classes, their legality rules, name rows, and the
lowering plan (issue 15 item 2).

A *target class* is what a backend can write: a Hugging Face ``*ForCausalLM`` class (``backends/hf/families/``)
or a TensorRT-LLM checkpoint class (``backends/trtllm/classes/``). Each lives in one file that holds

* its **signature**: the IR structure it stands for (norm kind, positions, experts, ...);
* its **legality rules** (MLIR ``ConversionTarget`` style): each :class:`Rule` names what the class cannot
  express and produces the refusal line when the model has it;
* its **name rows**, in one dialect (:func:`parse_rows`), and its **config builder**.

Classes register with :meth:`Registry.register`; classification (:meth:`Registry.classify`) is the first
registered class whose signature and rules hold, or, when none is legal, the first whose signature holds with
its refusal lines. A backend computes a :class:`Plan` once and shares it between legalize, check and emit.

Row dialect, one row per line (``#`` comments), 5 whitespace-separated columns::

    role        params               name                                         transform  when
    attention   q_norm               model.layers.{L}.self_attn.q_norm.weight     copy       always

* ``role``: the node role (:func:`mexc.ir.analysis.node_roles`);
* ``params``: the IR param, or ``a+b``: params that make one tensor (concatenated on dim 0, or as the
  transform says);
* ``name``: ``{L}`` = layer index (stage-local for TensorRT-LLM), ``{E}`` = expert index;
* ``transform``: one of the target's transforms (hf: copy, zc, conv1d, expert; trtllm: copy, moe_fc);
* ``when``: ``always`` or a flag of the class (``attn_bias``, ``mlp_bias``, ``untied``...): a row whose flag
  is off does not exist; an ``always`` row of a param the IR lacks is written as zeros (a bias the class
  always has).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from ..ir import Model


@dataclass(frozen=True)
class Row:
    """One line of a name table: IR ``role.params`` -> target tensor ``name``."""

    role: str
    params: tuple[str, ...]
    name: str
    transform: str
    when: str
    line: int
    family: str = ""

    def __str__(self) -> str:
        return f"{self.role}.{'+'.join(self.params)} -> {self.name} ({self.transform}, {self.when})"


def parse_rows(text: str, *, transforms: Iterable[str], conditions: Iterable[str], where: str,
               family: str = "") -> list[Row]:
    """Rows of the name-table dialect (module docstring); a malformed row raises ValueError naming ``where``
    and the line, at import time."""
    transforms, conditions = tuple(transforms), tuple(conditions)
    rows: list[Row] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        cols = line.split()
        if len(cols) != 5:
            raise ValueError(f"{where} name row {lineno}: expected 5 columns, got {len(cols)}: {raw!r}")
        role, params, name, transform, when = cols
        if transform not in transforms:
            raise ValueError(f"{where} name row {lineno}: unknown transform {transform!r} (one of {transforms})")
        if when not in conditions:
            raise ValueError(f"{where} name row {lineno}: unknown condition {when!r} (one of {conditions})")
        rows.append(Row(role, tuple(params.split("+")), name, transform, when, lineno, family))
    return rows


@dataclass(frozen=True)
class Rule:
    """One thing a target class cannot express. ``check(facts)`` returns the refusal line(s) when the model
    has it (a str, a list of str, or None/empty when the rule holds)."""

    cannot: str
    check: Callable[[Facts], str | list[str] | None]

    def refusals(self, facts: Facts) -> list[str]:
        out = self.check(facts)
        if not out:
            return []
        return [out] if isinstance(out, str) else list(out)


class Facts:
    """What the rules read, computed once per classification: the model's nodes by op and a few summaries.
    ``name`` is the class being judged (refusal lines name it)."""

    def __init__(self, model: Model, target: str = ""):
        g = model.graph
        self.model = model
        self.target = target
        self.config = model.config
        self.attns = list(g.find("attention"))
        self.mlas = list(g.find("mla"))       # multi-latent attention (DeepSeek)
        self.mlps = list(g.find("mlp"))
        self.moes = list(g.find("moe"))
        self.norms = list(g.find("norm"))
        self.emb = next(g.find("embedding"), None)
        self.heads = list(g.find("lm_head"))
        self.kinds = {n.attrs["kind"] for n in self.norms}
        self.positions = {a.attrs["position"] for a in self.attns}
        self.learned = self.emb is not None and "position" in self.emb.params
        self.gated = {m.attrs["gated"] for m in self.mlps}
        self.acts = {m.attrs["activation"] for m in self.mlps}
        self.a0 = self.attns[0].attrs if self.attns else {}
        self.name = ""
        self.cls: TargetClass | None = None

    def has(self, nodes, names) -> bool:
        """Whether any of ``nodes`` holds any param of ``names``."""
        return any(k in n.params for n in nodes for k in names)


@dataclass
class TargetClass:
    """A target class: ``name`` (registry key), ``label`` (what refusal lines call it), ``signature``, ``rules``,
    ``rows`` and ``config`` (``config(facts, **extra) -> dict``); ``extra`` holds class-specific data."""

    name: str
    label: str
    signature: Callable[[Facts], bool]
    rules: list[Rule] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)
    config: Callable[..., dict] | None = None
    extra: dict = field(default_factory=dict)

    def refusals(self, facts: Facts) -> list[str]:
        facts.name, facts.cls = self.label, self
        return [line for r in self.rules for line in r.refusals(facts)]

    def describe(self) -> str:
        out = [f"[{self.name}] {self.label}"]
        out += [f"  cannot: {r.cannot}" for r in self.rules]
        for r in self.rows:
            extra = "" if (r.transform, r.when) == ("copy", "always") else f"  ({r.transform}, {r.when})"
            out.append(f"  {r.role + '.' + '+'.join(r.params):34s} -> {r.name}{extra}")
        return "\n".join(out)


class Registry:
    """Target classes of one backend, in registration order (= classification order)."""

    def __init__(self, target: str, none_line: Callable[[Facts], str]):
        self.target = target
        self.classes: dict[str, TargetClass] = {}
        self._none_line = none_line

    def register(self, cls: TargetClass) -> TargetClass:
        if cls.name in self.classes:
            raise ValueError(f"{self.target} target class {cls.name!r} registered twice")
        self.classes[cls.name] = cls
        return cls

    def order(self) -> list[str]:
        """Classification order: registration order, except that a class declared ``before=(...)`` others
        comes ahead of them (a stable topological sort; a cycle or an unknown name is an error at import)."""
        names = list(self.classes)
        after = {n: {m for m, c in self.classes.items() if n in c.extra.get("before", ())} for n in names}
        for n, c in self.classes.items():
            unknown = set(c.extra.get("before", ())) - set(names)
            if unknown:
                raise ValueError(f"{self.target} class {n!r} is declared before unknown classes {sorted(unknown)}")
        out: list[str] = []
        while len(out) < len(names):
            ready = [n for n in names if n not in out and after[n] <= set(out)]
            if not ready:
                raise ValueError(f"{self.target} classes {sorted(set(names) - set(out))} declare a cycle of before=")
            out.append(ready[0])
        self.classes = {n: self.classes[n] for n in out}
        return out

    def __getitem__(self, name: str) -> TargetClass:
        return self.classes[name]

    def __iter__(self):
        return iter(self.classes.values())

    def classify(self, model: Model, facts: Facts | None = None) -> tuple[TargetClass | None, list[str]]:
        """(class, refusal lines): the first class whose signature and rules hold; else the first whose
        signature holds, with its refusals; else (None, [why no class applies])."""
        facts = facts or Facts(model, self.target)
        first: tuple[TargetClass, list[str]] | None = None
        for cls in self.classes.values():
            if not cls.signature(facts):
                continue
            problems = cls.refusals(facts)
            if not problems:
                return cls, []
            first = first or (cls, problems)
        if first is not None:
            return first
        return None, [self._none_line(facts)]


def load_classes(package: str, path, registry: Registry, skip: tuple[str, ...] = ("common",)) -> None:
    """Import every module of a classes package (one file per target class registers itself), then fix the
    classification order: adding a class is adding its file."""
    import importlib
    import pkgutil

    for mod in sorted(m.name for m in pkgutil.iter_modules(path)):
        if mod not in skip:
            importlib.import_module(f"{package}.{mod}")
    registry.order()


@dataclass
class Plan:
    """The lowering of one model to one target, computed once: the class, its refusal lines, and whatever the
    backend derives from them (``data``: e.g. the tensor entries); legalize / check / emit share it."""

    cls: TargetClass | None
    problems: list[str]
    data: dict = field(default_factory=dict)

    @property
    def name(self) -> str | None:
        return self.cls.name if self.cls is not None else None


def make_pass(name: str, **options):
    """A registered pass object (what ``legalize`` returns instead of pipeline text); options are the pass's
    dataclass fields, so a misspelled one fails here, not in a text parser."""
    from ..passes import PASSES

    return PASSES[name](**options)


def model_fingerprint(model: Model) -> int:
    """A cheap key of the model's state (nodes, their wiring, attributes, params and their recipes by identity):
    a plan computed for one state is not reused after a pass changed it."""
    return hash(tuple((id(n), n.op, n.layer, n.stage, tuple(id(v) for v in n.inputs),
                       repr(sorted(n.attrs.items())),
                       tuple((k, id(p.source), str(p.type), str(p.sharding)) for k, p in n.params.items()))
                      for n in model.graph.nodes))


_PLANS: dict[tuple[str, int, int], Plan] = {}


def cached_plan(target: str, model: Model, compute: Callable[[Model], Plan]) -> Plan:
    """``compute(model)`` once per model state and target (legalize, check and emit share it); a few recent
    plans are kept (models are not weak-referenceable)."""
    key = (target, id(model), model_fingerprint(model))
    if key not in _PLANS:
        if len(_PLANS) >= 8:
            _PLANS.pop(next(iter(_PLANS)))
        _PLANS[key] = compute(model)
    return _PLANS[key]
