"""Building a TensorRT engine from the tensorrt-profile ONNX, or saying how to (trtexec).

``tensorrt`` is imported lazily, only inside :func:`build_engine`. One optimization profile covers batch
1..max_batch_size, new tokens 1..max_input_len and past 0..max_seq_len-1 (attention_mask 1..max_seq_len).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ...errors import BackendError
from ..base import write_new
from ..options import TensorRTOptions

ENGINE_FILE = "model.plan"
_BUILDER_API = ("Logger", "Builder", "OnnxParser", "NetworkDefinitionCreationFlag")


def tensorrt_status() -> tuple[str | None, str]:
    """``(version, "")`` when a real TensorRT Python package is importable (a ``__version__`` and the builder
    API: Logger, Builder, OnnxParser), else ``(None, why)``. ``tensorrt-stubs`` makes ``import tensorrt``
    succeed with an empty namespace package; that is not TensorRT."""
    import importlib
    import importlib.util
    import sys

    try:
        trt = sys.modules.get("tensorrt")
        if trt is None:
            if importlib.util.find_spec("tensorrt") is None:
                return None, "no `tensorrt` module"
            trt = importlib.import_module("tensorrt")
    except Exception as e:   # a broken install raises anything (missing libnvinfer, CUDA errors)
        return None, f"`import tensorrt` failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    version = getattr(trt, "__version__", None)
    missing = [n for n in _BUILDER_API if not hasattr(trt, n)]
    if not isinstance(version, str) or missing:
        where = list(getattr(trt, "__path__", [])) or [getattr(trt, "__file__", "?")]
        return None, (f"`import tensorrt` finds {where[0]} without a version or the builder API (missing "
                      f"{', '.join(missing) or '__version__'}): type stubs (tensorrt-stubs) or a partial install")
    return version, ""


def _io_dims(onnx_path: Path) -> list[tuple[str, list]]:
    import onnx

    m = onnx.load(str(onnx_path), load_external_data=False)
    out = []
    for i in m.graph.input:
        dims = [d.dim_param if d.HasField("dim_param") else d.dim_value for d in i.type.tensor_type.shape.dim]
        out.append((i.name, dims))
    return out


def profile_shapes(onnx_path: Path, opts: TensorRTOptions) -> dict[str, tuple[tuple, tuple, tuple]]:
    """input name -> (min, opt, max) shapes."""
    b_max, s_max, t_max = opts.max_batch_size, opts.max_input_len, opts.max_seq_len
    b_opt = max(1, b_max // 2)
    s_opt = max(1, min(s_max, 128))
    p_opt = max(0, t_max // 2)
    sym = {
        "batch_size": (1, b_opt, b_max),
        "sequence_length": (1, s_opt, s_max),
        "past_sequence_length": (0, p_opt, max(0, t_max - 1)),
        "total_sequence_length": (1, min(t_max, p_opt + s_opt), t_max),
    }
    shapes = {}
    for name, dims in _io_dims(onnx_path):
        mins, opts_, maxs = [], [], []
        for d in dims:
            lo, mid, hi = sym.get(d, (d, d, d)) if isinstance(d, str) else (d, d, d)
            mins.append(lo)
            opts_.append(mid)
            maxs.append(hi)
        shapes[name] = (tuple(mins), tuple(opts_), tuple(maxs))
    return shapes


def trtexec_command(out: Path, opts: TensorRTOptions) -> str:
    onnx_path = Path(out) / "model.onnx"
    shapes = profile_shapes(onnx_path, opts)

    def fmt(k):
        return ",".join(f"{n}:{'x'.join(map(str, s[k]))}" for n, s in shapes.items())

    return (f"trtexec --onnx={onnx_path} --saveEngine={Path(out) / ENGINE_FILE} --stronglyTyped "
            f"--minShapes={fmt(0)} --optShapes={fmt(1)} --maxShapes={fmt(2)}")


def build_engine(out: Path, opts: TensorRTOptions, log: Callable[[str], None]) -> list[str]:  # pragma: no cover
    """Build ``model.plan`` with the TensorRT Python API (needs TensorRT >= 10.15 for RMSNormalization,
    RotaryEmbedding and Attention). Precision comes from the ONNX dtypes (strongly typed network)."""
    import tensorrt as trt

    onnx_path = Path(out) / "model.onnx"
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    strongly = hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
    if strongly:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    elif hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):      # resolves model.onnx.data next to the file
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendError(f"TensorRT could not parse {onnx_path}: {errs}",
                           hint="TensorRT >= 10.15 is needed for RMSNormalization/RotaryEmbedding/Attention")
    config = builder.create_builder_config()
    if not strongly:   # weakly typed (old TensorRT): allow the reduced precisions the graph is written in
        dt = {"float16": "FP16", "bfloat16": "BF16"}.get(opts.dtype or "", None)
        if dt and hasattr(trt.BuilderFlag, dt):
            config.set_flag(getattr(trt.BuilderFlag, dt))
    prof = builder.create_optimization_profile()
    for name, (lo, mid, hi) in profile_shapes(onnx_path, opts).items():
        prof.set_shape(name, trt.Dims(list(lo)), trt.Dims(list(mid)), trt.Dims(list(hi)))
    config.add_optimization_profile(prof)
    log(f"building TensorRT engine from {onnx_path}")
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BackendError("TensorRT failed to build the engine (see its log above)",
                           hint="try the trtexec command with --verbose: " + trtexec_command(out, opts))
    path = Path(out) / ENGINE_FILE
    write_new(path, bytes(plan))
    return [f"built TensorRT engine {path} ({path.stat().st_size} bytes)"]
