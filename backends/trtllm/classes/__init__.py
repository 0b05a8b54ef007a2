"""TensorRT-LLM checkpoint classes, one file each, registered in classification order (the first whose
signature and rules hold; :mod:`.common` holds what they share; issue 15 item 2). The writer
(:mod:`mexc.backends.trtllm`) and the reader (:mod:`mexc.frontends.trtllm`) both use these tables.
"""

from __future__ import annotations

from . import falcon, gemma, gpt, llama, qwen3  # noqa: F401
from .common import REGISTRY, falcon_layout  # noqa: F401 - re-exported

# classification order: the first class whose signature and rules hold wins
REGISTRY.order(["GemmaForCausalLM", "FalconForCausalLM", "QWenForCausalLM", "LlamaForCausalLM", "GPTForCausalLM"])


def by_architecture(arch: str):
    """The class a config.json ``architecture`` names (aliases included), or None."""
    for cls in REGISTRY:
        if arch == cls.name or arch in cls.extra.get("aliases", ()):
            return cls
    return None
