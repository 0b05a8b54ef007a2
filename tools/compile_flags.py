"""`mexc compile` options a target would ignore are refused, never dropped silently (issue 19 item 8).

:func:`check_compile_flags` takes the parsed arguments (target-specific options left out are ``None``), raises
:class:`~mexc.errors.UsageError` for an option the target does not read (a field of another target's options
class, :mod:`mexc.backends.options`, that the target's own class lacks), a combination the target cannot do
whatever the model (:func:`_target_refusal`: ``--quant`` for hf, ``--tp``/``--pp``/``--ep`` for hf and onnx, ...)
or a contradiction, and fills the target's defaults for the rest; :func:`compile_options` builds the target's
options object from them.
:func:`precheck_compile` adds the ``-o`` checks; the CLI runs it before torch is imported, so these usage
errors come in a fraction of a second and before any tensor is read (tools/bench_startup.py).
"""

from __future__ import annotations

from dataclasses import fields

from ..errors import UsageError


def _used_by(target: str, own: type) -> dict[str, list[str]]:
    """Target-specific option -> the targets whose options class has it (the built-in ones, and ``target``'s
    own class when it is a plugin's): a flag given for a target outside its list is refused, never ignored."""
    from ..backends.options import BUILTIN, option_fields

    classes = {**BUILTIN, target: own}
    used: dict[str, list[str]] = {}
    for name, cls in classes.items():
        for k in option_fields(cls):
            used.setdefault(k, []).append(name)
    return used


def _target_refusal(a) -> tuple[str, str] | None:
    """A --quant / --tp / --pp / --ep / --dtype / --group-size combination the target cannot do whatever the
    model: (message, hint), judged before the checkpoint is read. The backends' ``check()`` keeps the same rules
    for library callers (backends/hf/backend.py, backends/onnx/__init__.py, backends/trtllm/__init__.py)."""
    layout = [f"--{k} {getattr(a, k)}" for k in ("tp", "pp", "ep") if getattr(a, k) != 1]
    if a.target == "hf":
        if a.quant:
            return (f"--quant {a.quant} does nothing the hf target can express: mexc writes no loader-readable "
                    "quantization config", "drop --quant and quantize at load time (e.g. vllm serve OUT "
                    "--quantization fp8); --target trtllm and onnx take --quant where the model allows it")
        if layout:
            return (f"{' '.join(layout)}: the hf target writes one unsharded model; loaders shard it at load time",
                    "drop --tp/--pp/--ep and shard when serving (vllm serve OUT --tensor-parallel-size N, "
                    "trtllm-serve OUT --tp_size N)")
    elif a.target in ("onnx", "tensorrt"):
        if layout:
            return (f"{' '.join(layout)}: the ONNX graph is single-device", "drop --tp/--pp/--ep")
        ort = a.target == "onnx" and a.profile in (None, "ort")
        if a.quant and ort and a.dtype == "bfloat16":
            return ("--quant with --dtype bfloat16: ONNX Runtime's CPU MatMulNBits has no bfloat16 kernel",
                    "use --dtype float32 or float16, or --profile tensorrt")
        gs = a.group_size
        if a.quant and ort and gs is not None and (gs < 16 or gs & (gs - 1)):
            return (f"--group-size {gs}: ONNX Runtime's MatMulNBits needs a power of two >= 16",
                    "use --group-size 32 (the default), 64 or 128")
    elif a.target == "trtllm":
        if a.quant and a.group_size is not None:
            return (f"--group-size {a.group_size} with --target trtllm: group-wise int4 (AWQ/GPTQ) needs calibrated "
                    "scales, which mexc does not compute", "drop --group-size: trtllm-build quantizes per channel")
        if a.ep != 1 and a.ep != a.tp:
            return (f"--ep {a.ep} with --tp {a.tp}: TensorRT-LLM's expert parallelism must equal the tensor-parallel "
                    "size (moe_tp * moe_ep == tp, mexc writes moe_tp = 1)", f"use --ep {a.tp} or drop --ep")
    return None


def check_compile_flags(a) -> None:
    """Refuse options the target would ignore or cannot do; fill the defaults of the ones left out. Runs before
    the checkpoint is read (and before torch is imported)."""
    from ..backends.registry import options_class

    cls = options_class(a.target)
    default = cls()
    used_by = _used_by(a.target, cls)
    for k in sorted(k for k in used_by if getattr(a, k, None) is not None):
        if a.target not in used_by[k]:
            flag = "--" + k.replace("_", "-")
            raise UsageError(f"{flag} does nothing for --target {a.target}",
                             hint=f"it applies to --target {' / '.join(used_by[k])}; drop it")
    if a.target == "tensorrt" and a.profile == "ort":
        raise UsageError("--target tensorrt always writes the tensorrt profile; --profile ort contradicts it",
                         hint="use --target onnx --profile ort for ONNX Runtime")
    if a.group_size is not None and a.quant not in ("int4-wo", "int8-wo"):
        raise UsageError(f"--group-size {a.group_size} without --quant int4-wo or int8-wo does nothing",
                         hint="add --quant int4-wo (or int8-wo), or drop --group-size")
    refusal = _target_refusal(a)
    if refusal:
        raise UsageError(refusal[0], hint=refusal[1])
    input_given = a.max_input_len is not None
    for f in fields(cls):
        if getattr(a, f.name, None) is None and f.name in used_by:
            setattr(a, f.name, getattr(default, f.name))
    if a.group_size is None:
        a.group_size = default.group_size
    if not (hasattr(default, "max_input_len") and hasattr(default, "max_seq_len")):
        return
    if not input_given:   # the default input length never exceeds the sequence length the user chose
        a.max_input_len = min(a.max_input_len, a.max_seq_len)
    if a.max_input_len > a.max_seq_len:
        raise UsageError(f"--max-input-len {a.max_input_len} is longer than --max-seq-len {a.max_seq_len}",
                         hint="the sequence length counts the input: raise --max-seq-len or lower --max-input-len")


def compile_options(a):
    """The options object of ``a.target`` (its class from :func:`mexc.backends.registry.options_class`) from
    the parsed and checked arguments: every field of the class, from the flag of the same name."""
    from ..backends.registry import options_class

    cls = options_class(a.target)
    return cls(**{f.name: getattr(a, f.name) for f in fields(cls)
                  if hasattr(a, f.name) and getattr(a, f.name) is not None})


def precheck_compile(a) -> None:
    """What `mexc compile` can refuse from the command line alone, in modules that import no torch: flags the
    target cannot take, an -o that is the checkpoint or exists (compile_checkpoint checks both again)."""
    from pathlib import Path

    from ..backends.output import check_output
    from ..driver import check_apart

    check_compile_flags(a)
    check_apart(a.ckpt, a.out)
    check_output(Path(a.out), a.force)
