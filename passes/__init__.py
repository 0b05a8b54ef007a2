"""mexc.passes: the pass infrastructure and the built-in passes (one module each)."""

from .infra import (PASSES, Pass, PassManager, PassResult, load_entry_point_passes, load_pass_file,
                    register_pass)
from .pipeline import format_pass, format_pipeline, parse_pipeline

# built-in passes register themselves on import
from . import canonicalize, dce, fuse_qkv, lower_dtype, quantize, relayout_qkv, reshard  # noqa: E402,F401
from . import fold_moe_scaling, rope_to_half  # noqa: E402,F401

__all__ = ["PASSES", "Pass", "PassManager", "PassResult", "load_entry_point_passes", "load_pass_file",
           "register_pass", "format_pass", "format_pipeline", "parse_pipeline"]
