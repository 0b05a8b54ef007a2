"""TensorRT-LLM checkpoint classes, one file each (:mod:`.common` holds what they share; issue 15 item 2). The writer
(:mod:`mexc.backends.trtllm`) and the reader (:mod:`mexc.frontends.trtllm`) both use these tables.
"""

from __future__ import annotations

from ...lowering import load_classes
from .common import REGISTRY, falcon_layout  # noqa: F401 - re-exported

# every other module of this package is one class; the classification order is registration order with each
# file's before= (the first class whose signature and rules hold wins)
load_classes(__name__, __path__, REGISTRY)


def by_architecture(arch: str):
    """The class a config.json ``architecture`` names (aliases included), or None."""
    for cls in REGISTRY:
        if arch == cls.name or arch in cls.extra.get("aliases", ()):
            return cls
    return None
