"""The options of `mexc compile`, in a module that imports no torch: the CLI judges flags with them before it
loads anything heavy (re-exported by :mod:`mexc.backends.base`).

:class:`CompileOptions` holds what every target takes (layout, dtype, quantization, vocabulary, passes, output
handling). Each target declares a subclass holding only what that target reads, as its backend's ``options``
attribute: :class:`TrtllmOptions`, :class:`OnnxOptions`, :class:`TensorRTOptions`, :class:`HFOptions` (a plugin
backend declares its own; :func:`mexc.backends.registry.options_class` finds a target's class, for the built-in
targets without importing the backend). A field is the `mexc compile` flag of the same name (``max_seq_len`` ->
``--max-seq-len``); a flag that only other targets' classes have is refused in one line (tools/compile_flags.py).

``CompileOptions(target=T, **fields)`` builds target T's class, the form library callers used when one bag held
every option: ``CompileOptions(target="onnx", profile="tensorrt")`` is an :class:`OnnxOptions`, and a field T
does not read is a :class:`~mexc.errors.UsageError`. ``CompileOptions()`` alone is the common part, which
:func:`for_target` (called by ``compile_checkpoint``) completes with the target's defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from ..errors import UsageError

# fields that must be positive integers, where a class has them
_POSITIVE = ("tp", "pp", "ep", "jobs", "max_batch_size", "max_input_len", "max_seq_len", "max_shard_size")


@dataclass
class CompileOptions:
    """What every target takes (the CLI contract), with defaults."""

    target: str = "trtllm"
    tp: int = 1
    pp: int = 1
    ep: int = 1
    dtype: str | None = None              # float32 | float16 | bfloat16; None = the checkpoint's
    quant: str | None = None              # int8-wo | int4-wo | fp8
    group_size: int = 0
    vocab_size: int | None = None
    pipeline: str = ""                    # user passes, run before the backend's legalization
    build: str = "auto"                   # auto | always | never
    force: bool = False
    jobs: int = 2                         # ranks (or files) written in parallel

    def __new__(cls, *args, **kw):
        if cls is not CompileOptions or not (args or kw):  # a target's own class, or the bare common part
            return super().__new__(cls)
        from .registry import options_class

        target = kw.get("target", args[0] if args else "trtllm")
        sub = options_class(target)
        names = {f.name for f in fields(sub)}
        foreign = [k for k in kw if k not in names]
        if foreign:
            flags = ", ".join("--" + k.replace("_", "-") for k in foreign)
            raise UsageError(f"{flags}: not an option of --target {target} ({sub.__module__}.{sub.__qualname__})",
                             hint=f"drop {flags}; the options of --target {target}: "
                                  f"{', '.join(f.name for f in fields(sub))}")
        return super().__new__(sub)   # Python then runs sub.__init__ with the same arguments

    def validate(self) -> None:
        for k in _POSITIVE:
            v = getattr(self, k, 1)
            if v is None and k == "max_shard_size":   # the default: $MEXC_HF_MAX_SHARD_BYTES or 5 GB
                continue
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


@dataclass
class TrtllmOptions(CompileOptions):
    """``--target trtllm``: the engine limits trtllm-build takes (backends/trtllm/build.py) and the embedding
    split (TensorRT-LLM's ``use_parallel_embedding``)."""

    max_batch_size: int = 8
    max_input_len: int = 1024
    max_seq_len: int = 2048
    parallel_embedding: bool = False


@dataclass
class OnnxOptions(CompileOptions):
    """``--target onnx``: the profile, the position tables' length and the MatMulNBits settings of ``--quant``."""

    target: str = "onnx"
    profile: str = "ort"                  # ort | tensorrt
    max_seq_len: int = 2048               # rows of the rope / position tables (at least the model's)
    accuracy_level: int = 4               # ort: MatMulNBits accuracy_level (4 = int8 compute on CPU, as OGB)
    quant_lm_head: bool | None = None     # quantize lm_head with --quant (None = the profile's default)

    def validate(self) -> None:
        super().validate()
        if self.profile not in ("ort", "tensorrt"):
            raise UsageError(f"--profile must be ort or tensorrt, got {self.profile!r}")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise UsageError(f"--accuracy-level must be 0-4, got {self.accuracy_level!r}",
                             hint="e.g. --accuracy-level 4")


@dataclass
class TensorRTOptions(CompileOptions):
    """``--target tensorrt``: the tensorrt-profile ONNX and the engine's shape profile (backends/onnx/tensorrt.py)."""

    target: str = "tensorrt"
    profile: str = "tensorrt"             # always tensorrt (given for symmetry with --target onnx)
    max_batch_size: int = 8
    max_input_len: int = 1024
    max_seq_len: int = 2048
    quant_lm_head: bool | None = None     # quantize lm_head with --quant (None = no, the profile's default)

    def validate(self) -> None:
        super().validate()
        if self.profile != "tensorrt":
            raise UsageError("--target tensorrt always writes the tensorrt profile; --profile ort contradicts it",
                             hint="use --target onnx --profile ort for ONNX Runtime")


@dataclass
class HFOptions(CompileOptions):
    """``--target hf``: the largest ``model-*.safetensors`` shard."""

    target: str = "hf"
    max_shard_size: int | None = None     # bytes; None = $MEXC_HF_MAX_SHARD_BYTES, else 5 GB (transformers' "5GB")


# the built-in targets' classes, looked up without importing their backends (each backend's ``options``
# attribute names the same class: tests/test_backend_registry.py checks it)
BUILTIN = {"trtllm": TrtllmOptions, "hf": HFOptions, "onnx": OnnxOptions, "tensorrt": TensorRTOptions}


def option_fields(cls: type[CompileOptions]) -> tuple[str, ...]:
    """The fields of ``cls`` beyond the common ones: the flags only its target takes."""
    common = {f.name for f in fields(CompileOptions)}
    return tuple(f.name for f in fields(cls) if f.name not in common)


def for_target(opts: CompileOptions) -> CompileOptions:
    """``opts`` as its target's class: itself when it is one, the common part completed with the target's
    defaults when it is a bare :class:`CompileOptions`; a :class:`UsageError` for another target's class."""
    from .registry import options_class

    cls = options_class(opts.target)
    if isinstance(opts, cls):
        return opts
    if type(opts) is CompileOptions:
        return cls(**{f.name: getattr(opts, f.name) for f in fields(CompileOptions)})
    raise UsageError(f"{type(opts).__name__} holds the options of another target than --target {opts.target}",
                     hint=f"use {cls.__module__}.{cls.__qualname__} (or CompileOptions(target={opts.target!r}, ...))")
