"""Lazy weights, in one import: stores (:mod:`mexc.ir.stores`), recipes and the tensor cache
(:mod:`mexc.ir.recipes`), the recipe op set (:mod:`mexc.ir.recipe_ops`), pieces for copy-free writing
(:mod:`mexc.ir.pieces`) and quantization numerics (:mod:`mexc.ir.quant`). Kept so ``mexc.ir.tensors`` imports
elsewhere keep working.
"""

from __future__ import annotations

from . import recipe_ops  # noqa: F401  (the op set)
from .pieces import ColumnCat, copy_piece, take_rows
from .quant import QUANT_SCHEMES, dequantize_tensor, nbytes_of, quant_scales, quantize_tensor
from .recipes import CACHEABLE_OPS, RECIPE_OPS, Recipe, RecipeOp, TensorCache, derive, load, recipe_op
from .stores import STORE_KINDS, RandomStore, SafetensorsStore, Store, register_store

__all__ = [
    "CACHEABLE_OPS",
    "QUANT_SCHEMES",
    "RECIPE_OPS",
    "STORE_KINDS",
    "ColumnCat",
    "RandomStore",
    "Recipe",
    "RecipeOp",
    "SafetensorsStore",
    "Store",
    "TensorCache",
    "copy_piece",
    "dequantize_tensor",
    "derive",
    "load",
    "nbytes_of",
    "quant_scales",
    "quantize_tensor",
    "recipe_op",
    "register_store",
    "take_rows",
]  # fmt: skip
