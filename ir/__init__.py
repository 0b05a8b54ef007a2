"""mexc.ir: the typed layer-graph IR.

Types (frozen): :class:`DType`, :class:`TensorType`, :class:`QKVLayout`, :class:`Sharding`, :class:`Rope`,
:class:`Parallelism`, :class:`ModelConfig`. Graph (slotted, identity): :class:`Value`, :class:`Param`,
:class:`Node`, :class:`Graph`, :class:`Model`. Lazy weights: :class:`Recipe` built with :func:`load` and
:func:`derive`. Text: ``str(model)`` and :func:`parse`. Checking: :func:`verify`.
"""

from .builder import Builder
from .graph import Graph, Model, Node, Param, Value
from .ops import OPS, OpSchema
from .tensors import (QUANT_SCHEMES, RECIPE_OPS, STORE_KINDS, RandomStore, Recipe, SafetensorsStore, Store,
                      derive, dequantize_tensor, load, quantize_tensor, register_store)
from .text import parse, print_model
from .types import (REPLICATED, DType, ModelConfig, Parallelism, QKVLayout, Rope, Sharding, TensorType, bf16,
                    f8e4m3, f16, f32, i4, i8, i64)
from .verifier import problems, verify


def structurally_equal(a: Model, b: Model) -> bool:
    """Two models are equal when their text forms are (the text form is complete by design)."""
    return print_model(a) == print_model(b)


__all__ = [
    "Builder", "Graph", "Model", "Node", "Param", "Value", "OPS", "OpSchema", "QUANT_SCHEMES", "RECIPE_OPS",
    "STORE_KINDS", "RandomStore", "Recipe", "SafetensorsStore", "Store", "derive", "dequantize_tensor", "load",
    "quantize_tensor", "register_store", "parse", "print_model", "REPLICATED", "DType", "ModelConfig",
    "Parallelism", "QKVLayout", "Rope", "Sharding", "TensorType", "bf16", "f8e4m3", "f16", "f32", "i4", "i8",
    "i64", "problems", "verify", "structurally_equal",
]  # fmt: skip
