"""The options of `mexc compile` (:class:`CompileOptions`), in a module that imports no torch: the CLI judges
flags with them before it loads anything heavy (re-exported by :mod:`mexc.backends.base`)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UsageError


@dataclass
class CompileOptions:
    """Everything `mexc compile` takes (the CLI contract), with defaults."""

    target: str = "trtllm"
    tp: int = 1
    pp: int = 1
    ep: int = 1
    dtype: str | None = None              # float32 | float16 | bfloat16; None = the checkpoint's
    quant: str | None = None              # int8-wo | int4-wo | fp8
    group_size: int = 0
    vocab_size: int | None = None
    profile: str = "ort"                  # onnx: ort | tensorrt
    pipeline: str = ""                    # user passes, run before the backend's legalization
    build: str = "auto"                   # auto | always | never
    force: bool = False
    max_batch_size: int = 8
    max_input_len: int = 1024
    max_seq_len: int = 2048
    jobs: int = 2
    parallel_embedding: bool = False
    accuracy_level: int = 4               # onnx ort: MatMulNBits accuracy_level (4 = int8 compute on CPU, as OGB)
    quant_lm_head: bool | None = None     # onnx: quantize lm_head with --quant (None = the profile's default)

    def validate(self) -> None:
        for k in ("tp", "pp", "ep", "jobs", "max_batch_size", "max_input_len", "max_seq_len"):
            v = getattr(self, k)
            if not isinstance(v, int) or v < 1:
                raise UsageError(f"--{k.replace('_', '-')} must be a positive integer, got {v!r}",
                                 hint=f"e.g. --{k.replace('_', '-')} 2")
        if self.vocab_size is not None and self.vocab_size < 1:
            raise UsageError(f"--vocab-size must be positive, got {self.vocab_size}")
        if self.build not in ("auto", "always", "never"):
            raise UsageError(f"--build must be auto, always or never, got {self.build!r}")
        if self.dtype is not None and self.dtype not in ("float32", "float16", "bfloat16"):
            raise UsageError(f"--dtype must be float32, float16 or bfloat16, got {self.dtype!r}")
        if self.quant is not None and self.quant not in ("int8-wo", "int4-wo", "fp8"):
            raise UsageError(f"--quant must be int8-wo, int4-wo or fp8, got {self.quant!r}")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise UsageError(f"--accuracy-level must be 0-4, got {self.accuracy_level!r}", hint="e.g. --accuracy-level 4")
