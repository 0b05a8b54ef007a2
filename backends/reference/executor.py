"""Compatibility names: the reference executor now lives in :mod:`mexc.ir.interpreter` and the numeric
conventions it computes with (rope tables, norms, activations) in :mod:`mexc.ir.semantics`."""

from ...ir.graph import Param
from ...ir.interpreter import ReferenceExecutor, _linear, _Weights, run
from ...ir.semantics import activation, apply_rope, llama3_inv_freq, rope_tables
from ...ir.semantics import llama3_inv_freq as _llama3_inv_freq
from ...ir.semantics import norm as _norm

__all__ = ["Param", "ReferenceExecutor", "activation", "apply_rope", "rope_tables", "run"]
_COMPAT = (_Weights, _linear, _llama3_inv_freq, _norm, llama3_inv_freq)
