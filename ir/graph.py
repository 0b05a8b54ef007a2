"""Graph objects: Value, Param, Node, Graph, Model.

Slotted classes that compare by identity and keep use-def links correct by construction: a Node registers
itself as a user of its inputs; :meth:`Graph.remove` refuses a node whose output is still used;
:meth:`Value.replace_all_uses_with` rewires every user.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from ..errors import IRError
from .tensors import Recipe, Store
from .types import REPLICATED, ModelConfig, Parallelism, Sharding, TensorType


class Value:
    """An activation: the graph input, or the output of one node."""

    __slots__ = ("name", "producer", "uses", "__weakref__")

    def __init__(self, name: str | None = None, producer: Node | None = None):
        self.name = name
        self.producer = producer
        self.uses: list[Node] = []

    def replace_all_uses_with(self, other: Value) -> int:
        n = 0
        for user in list(self.uses):
            user.inputs = tuple(other if v is self else v for v in user.inputs)
            n += 1
        return n

    def __repr__(self) -> str:
        return f"Value({self.name or '?'})"


class Param:
    """A weight held by a node: a lazy recipe and how the target shards it."""

    __slots__ = ("source", "sharding")

    def __init__(self, source: Recipe, sharding: Sharding = REPLICATED):
        if not isinstance(source, Recipe):
            raise IRError(f"a Param's source must be a Recipe, got {type(source).__name__}")
        self.source = source
        self.sharding = sharding

    @property
    def type(self) -> TensorType:
        return self.source.type

    def __repr__(self) -> str:
        return f"Param({self.type}, {self.sharding})"


class Node:
    """One layer-granularity operation; see :mod:`mexc.ir.ops` for the op set and its schemas."""

    __slots__ = ("op", "_inputs", "output", "attrs", "params", "layer", "stage", "graph", "__weakref__")

    def __init__(self, op: str, inputs: Iterable[Value], attrs: dict[str, Any] | None = None,
                 params: dict[str, Param] | None = None, *, layer: int | None = None, stage: int = 0):
        self.op = op
        self._inputs: tuple[Value, ...] = ()
        self.output = Value(producer=self)
        self.attrs: dict[str, Any] = dict(attrs or {})
        self.params: dict[str, Param] = dict(params or {})
        self.layer = layer
        self.stage = stage
        self.graph: Graph | None = None
        self.inputs = tuple(inputs)

    @property
    def inputs(self) -> tuple[Value, ...]:
        return self._inputs

    @inputs.setter
    def inputs(self, values: tuple[Value, ...]):
        for v in self._inputs:
            if self in v.uses:
                v.uses.remove(self)
        for v in values:
            if not isinstance(v, Value):
                raise IRError(f"{self.op}: inputs must be Values, got {type(v).__name__}")
            v.uses.append(self)
        self._inputs = tuple(values)

    @property
    def location(self) -> str:
        """A human-readable IR location: ``node 7 (attention, layer 2)``."""
        idx = self.graph.nodes.index(self) if self.graph and self in self.graph.nodes else "?"
        where = f", layer {self.layer}" if self.layer is not None else ""
        return f"node {idx} ({self.op}{where})"

    def __repr__(self) -> str:
        return f"Node({self.op}, layer={self.layer}, stage={self.stage})"


class Graph:
    """An ordered (topologically sorted) list of nodes, one input (token ids) and one output (logits)."""

    __slots__ = ("nodes", "inputs", "outputs")

    def __init__(self):
        self.nodes: list[Node] = []
        self.inputs: list[Value] = [Value("input_ids")]
        self.outputs: list[Value] = []

    def append(self, node: Node) -> Value:
        self._adopt(node)
        self.nodes.append(node)
        return node.output

    def insert_after(self, anchor: Node, node: Node) -> Value:
        self._adopt(node)
        self.nodes.insert(self.nodes.index(anchor) + 1, node)
        return node.output

    def _adopt(self, node: Node):
        if node.graph is not None:
            raise IRError(f"{node!r} already belongs to a graph")
        node.graph = self

    def remove(self, node: Node):
        if node.output.uses or node.output in self.outputs:
            raise IRError(f"cannot remove {node.location}: its output is still used",
                          hint="replace_all_uses_with() first")
        node.inputs = ()
        self.nodes.remove(node)
        node.graph = None

    def find(self, op: str | Iterable[str] | None = None, layer: int | None = None) -> Iterator[Node]:
        ops = {op} if isinstance(op, str) else (set(op) if op is not None else None)
        for n in list(self.nodes):
            if (ops is None or n.op in ops) and (layer is None or n.layer == layer):
                yield n

    def params(self) -> Iterator[tuple[Node, str, Param]]:
        for n in self.nodes:
            for k, p in n.params.items():
                yield n, k, p

    def to_networkx(self):
        """A ``networkx.DiGraph`` view: one vertex per node (index), edges along activations."""
        import networkx as nx

        g = nx.DiGraph()
        index = {id(n): i for i, n in enumerate(self.nodes)}
        for i, n in enumerate(self.nodes):
            g.add_node(i, op=n.op, layer=n.layer, stage=n.stage,
                       label=n.op if n.layer is None else f"{n.op}[{n.layer}]",
                       params={k: str(p.type) for k, p in n.params.items()})
            for v in n.inputs:
                if v.producer is not None:
                    g.add_edge(index[id(v.producer)], i)
        return g


class Model:
    """A whole model: config, target parallel layout, graph, the stores its weights come from, metadata."""

    __slots__ = ("config", "parallel", "graph", "stores", "meta")

    def __init__(self, config: ModelConfig, graph: Graph | None = None, parallel: Parallelism | None = None,
                 stores: dict[str, Store] | None = None, meta: dict[str, Any] | None = None):
        self.config = config
        self.graph = graph or Graph()
        self.parallel = parallel or Parallelism()
        self.stores = dict(stores or {})
        self.meta = dict(meta or {})

    def __str__(self) -> str:
        from .text import print_model

        return print_model(self)

    def param_count(self) -> int:
        seen, n = set(), 0
        for _, _, p in self.graph.params():
            if p.source.key not in seen:
                seen.add(p.source.key)
                n += p.type.numel
        return n

    def bytes_by_dtype(self) -> dict[str, int]:
        seen, out = set(), {}
        for _, _, p in self.graph.params():
            if p.source.key not in seen:
                seen.add(p.source.key)
                out[p.type.dtype.value] = out.get(p.type.dtype.value, 0) + p.type.nbytes
        return out

    def layers(self) -> dict[int, list[Node]]:
        out: dict[int, list[Node]] = {}
        for n in self.graph.nodes:
            if n.layer is not None:
                out.setdefault(n.layer, []).append(n)
        return out

    def node(self, op: str, layer: int | None = None) -> Node:
        """The single node with this op (and layer); raises when there is none or several."""
        found = list(self.graph.find(op, layer))
        if len(found) != 1:
            raise IRError(f"expected one {op} node{'' if layer is None else f' in layer {layer}'}, found {len(found)}")
        return found[0]
