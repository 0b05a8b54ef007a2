"""The ONNX backend (``--target onnx``) and the TensorRT engine backend (``--target tensorrt``).

Both emit ``model.onnx`` + one external ``model.onnx.data`` straight from the IR (no tracing). ``onnx`` takes
``--profile ort`` (contrib ops for ONNX Runtime, plus ``genai_config.json``) or ``--profile tensorrt`` (standard
ops only); ``tensorrt`` always emits the tensorrt profile and then builds ``model.plan`` through the TensorRT
Python API when a real TensorRT is installed (:func:`tensorrt_status`: a version and the builder API).
See docs/onnx.md.
"""

from __future__ import annotations

from pathlib import Path

from ...errors import BackendError, ToolNotFoundError
from ...ir import Model
from ...ir.types import DType
from ..base import Backend, CompileOptions, EmitResult, register_backend
from ..options import OnnxOptions, TensorRTOptions
from ...passes.fold_moe_scaling import has_topk_scale
from .emit import emit_onnx
from .tensorrt import build_engine, tensorrt_status, trtexec_command

DTYPE_PASS = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def quant_lm_head(opts: CompileOptions, profile: str) -> bool:
    """Whether ``--quant`` covers the lm_head: ``--quant-lm-head`` if given, else yes for the ort profile (as
    onnxruntime-genai's model builder does for int4) and no for tensorrt."""
    return opts.quant_lm_head if opts.quant_lm_head is not None else profile == "ort"


def cpu_needs_float32(model: Model, opts: CompileOptions, profile: str) -> bool:
    """A weight-only quantized ort graph of a bf16 checkpoint (no ``--dtype``) computes in float32: ONNX Runtime's
    CPU provider registers MatMulNBits, GroupQueryAttention and SkipSimplifiedLayerNormalization for float and
    float16 only (onnxruntime docs/OperatorKernels.md, CPUExecutionProvider, com.microsoft domain)."""
    return (profile == "ort" and opts.quant in ("int4-wo", "int8-wo") and opts.dtype is None
            and model.config.dtype == DType.bf16)


class OnnxBackend(Backend):
    name = "onnx"
    options = OnnxOptions
    description = "ONNX decoder with KV cache (profiles: ort = ONNX Runtime contrib ops, tensorrt = standard ops)"

    def profile(self, opts: CompileOptions) -> str:
        return opts.profile

    def legalize_pipeline(self, opts: CompileOptions, model: Model) -> str:
        passes = ["canonicalize", "fuse-qkv", "relayout-qkv{to=concat}"]
        if has_topk_scale(model):   # exact; the lowering has no routing-weight scale (issue 16)
            passes.insert(0, "fold-moe-scaling")
        V = model.config.vocab_size
        for n in model.graph.find(("embedding", "lm_head")):
            p = n.params.get("word" if n.op == "embedding" else "weight")
            if p is not None and p.type.shape[0] != V and opts.vocab_size is None:
                passes.append(f"trim-vocab{{size={V}}}")
                break
        dtype = opts.dtype
        if cpu_needs_float32(model, opts, self.profile(opts)):
            dtype = "float32"
            model.meta.setdefault("notes", []).append(
                f"--quant {opts.quant} on a bfloat16 checkpoint: the ort profile computes in float32 (ONNX Runtime's "
                "CPU MatMulNBits has no bfloat16 kernel); pass --dtype float16 for a float16 graph")
        if dtype:
            passes.append(f"lower-dtype{{to={DTYPE_PASS[dtype]}}}")
        if opts.quant in ("int4-wo", "int8-wo") and not any(True for _ in model.graph.find("mla")):
            gs = opts.group_size or 32      # (MLA models are refused by check, in one line, before any group size)
            exclude = '""' if quant_lm_head(opts, self.profile(opts)) else "lm_head"   # "" = nothing excluded
            passes.append(f"quantize{{scheme={opts.quant} group-size={gs} exclude={exclude}}}")
        return ",".join(passes)

    def check(self, model: Model, opts: CompileOptions) -> list[str]:
        out = []
        prof = self.profile(opts)
        if prof not in ("ort", "tensorrt"):
            out.append(f"unknown --profile {prof!r} (hint: use ort or tensorrt)")
        if opts.tp != 1 or opts.pp != 1 or opts.ep != 1 or model.parallel.tp != 1 or model.parallel.pp != 1:
            out.append("the ONNX graph is single-device; compile with --tp 1 --pp 1 --ep 1 (hint: drop --tp/--pp)")
        if opts.quant in ("int4-wo", "int8-wo") and prof == "ort" and opts.dtype == "bfloat16":
            out.append("--quant with --dtype bfloat16: ONNX Runtime's CPU MatMulNBits has no bfloat16 kernel "
                       "(hint: --dtype float32 or float16, or --profile tensorrt)")
        if has_topk_scale(model):
            out.append("a MoE top-k scaling factor is not lowered; run fold-moe-scaling")
        if opts.quant == "fp8":
            out.append("fp8 weights are not supported by the onnx backend (hint: use --quant int4-wo or int8-wo)")
        if opts.quant in ("int4-wo", "int8-wo") and prof == "ort":
            gs = opts.group_size or 32
            if gs < 16 or gs & (gs - 1):
                out.append(f"MatMulNBits needs a power-of-two group size >= 16, got {gs} (hint: --group-size 32)")
        if any(True for _ in model.graph.find("mamba")):   # issue 18, docs/targets.md
            out.append("Mamba-2 mixer layers (hybrid models, Nemotron-H) have no ONNX lowering yet: the decoder "
                       "would need conv and SSM state inputs/outputs beside the KV cache (hint: --target hf)")
        if opts.quant and any(True for _ in model.graph.find("mla")):
            out.append("multi-latent attention weights are not quantized by the onnx lowering (hint: drop --quant)")
        for n in model.graph.nodes:
            if n.op == "moe" and any(p.type.dtype in (DType.i4, DType.i8) for p in n.params.values()):
                out.append(f"{n.location}: quantized MoE experts have no ONNX lowering (hint: drop --quant)")
        return out

    def emit(self, model: Model, out: Path, opts: CompileOptions, progress=None) -> EmitResult:
        return emit_onnx(model, Path(out), opts, self.profile(opts), progress=progress)


class TensorRTBackend(OnnxBackend):
    name = "tensorrt"
    options = TensorRTOptions
    description = "TensorRT engine built from the tensorrt-profile ONNX (needs the tensorrt Python package)"

    def profile(self, opts: CompileOptions) -> str:
        return "tensorrt"

    def preflight(self, out: Path, opts: CompileOptions) -> None:
        if opts.build != "always":
            return
        version, why = tensorrt_status()
        if version is None:
            raise ToolNotFoundError(f"--build always: TensorRT is not installed ({why}); nothing was written",
                                    hint="install TensorRT (pip install tensorrt), or use --build auto to write "
                                         f"the ONNX and get the full command (trtexec --onnx={out}/model.onnx "
                                         f"--saveEngine={out}/model.plan with shape ranges)")

    def build(self, out: Path, opts: CompileOptions, log) -> list[str]:
        cmd = trtexec_command(Path(out), opts)
        version, why = tensorrt_status()
        if version is None:
            if opts.build == "always":
                raise ToolNotFoundError(f"TensorRT is not installed ({why}); no engine was built",
                                        hint=f"install TensorRT (pip install tensorrt) or run: {cmd}")
            return [f"TensorRT is not installed ({why}); kept the ONNX, build the engine with: {cmd}"]
        log(f"TensorRT {version} found")
        return build_engine(Path(out), opts, log)


register_backend(OnnxBackend())
register_backend(TensorRTBackend())

__all__ = ["OnnxBackend", "TensorRTBackend", "emit_onnx", "trtexec_command", "build_engine", "BackendError"]
