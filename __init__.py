"""mexc: a graph-IR compiler for trained Megatron-LM / Megatron-Core language models.

Lift a checkpoint (:mod:`mexc.frontends.megatron`), rewrite it with passes (:mod:`mexc.passes`), lower it with
a backend (:mod:`mexc.backends`): TensorRT-LLM checkpoints and engines, Hugging Face layout, ONNX / TensorRT.
"""

__version__ = "0.1.0"

from .errors import MexcError  # noqa: E402

__all__ = ["MexcError", "__version__"]
