"""`mexc compile` options a target would ignore are refused, never dropped silently (issue 19 item 8).

:func:`check_compile_flags` takes the parsed arguments (options left out are ``None``), raises
:class:`~mexc.errors.UsageError` for an option the target does not read or a contradiction, and fills the
defaults of :class:`~mexc.backends.base.CompileOptions` for the rest.
"""

from __future__ import annotations

from ..errors import UsageError

# which targets read which compile option (anything else given explicitly is refused, never ignored)
_USED_BY = {"profile": ("onnx", "tensorrt"), "max_batch_size": ("trtllm", "tensorrt"),
            "max_input_len": ("trtllm", "tensorrt"), "max_seq_len": ("trtllm", "tensorrt", "onnx"),
            "parallel_embedding": ("trtllm",), "accuracy_level": ("onnx",), "quant_lm_head": ("onnx", "tensorrt")}


def check_compile_flags(a) -> None:
    """Refuse options the target would ignore; fill the defaults of the ones left out."""
    from ..backends.base import CompileOptions

    default = CompileOptions()
    given = {k for k in _USED_BY if getattr(a, k, None) is not None and getattr(a, k) is not False
             and not (k == "accuracy_level" and a.accuracy_level == default.accuracy_level)}
    if a.quant_lm_head is False:
        given.add("quant_lm_head")
    for k in sorted(given):
        if a.target not in _USED_BY[k]:
            flag = "--" + k.replace("_", "-")
            raise UsageError(f"{flag} does nothing for --target {a.target}",
                             hint=f"it applies to --target {' / '.join(_USED_BY[k])}; drop it")
    if a.target == "tensorrt" and a.profile == "ort":
        raise UsageError("--target tensorrt always writes the tensorrt profile; --profile ort contradicts it",
                         hint="use --target onnx --profile ort for ONNX Runtime")
    if a.group_size is not None and a.quant not in ("int4-wo", "int8-wo"):
        raise UsageError(f"--group-size {a.group_size} without --quant int4-wo or int8-wo does nothing",
                         hint="add --quant int4-wo (or int8-wo), or drop --group-size")
    input_given = a.max_input_len is not None
    for k in ("profile", "max_batch_size", "max_input_len", "max_seq_len"):
        if getattr(a, k) is None:
            setattr(a, k, getattr(default, k))
    if not input_given:   # the default input length never exceeds the sequence length the user chose
        a.max_input_len = min(a.max_input_len, a.max_seq_len)
    if a.group_size is None:
        a.group_size = default.group_size
    if a.target in ("trtllm", "tensorrt") and a.max_input_len > a.max_seq_len:
        raise UsageError(f"--max-input-len {a.max_input_len} is longer than --max-seq-len {a.max_seq_len}",
                         hint="the sequence length counts the input: raise --max-seq-len or lower --max-input-len")
