"""`mexc verify OUT --against CKPT`: check the whole compiled artifact, then compare its logits to the source's.

Steps, each printed as one line (``--json``: one object):

1. ``source``: the checkpoint recorded in ``OUT/mexc-manifest.json``, and whether ``--against`` is that one
   (same resolved path and iteration); a different one is said before any FAIL, which it may explain.
   ``--against`` is lifted with the compile's ``--config`` (its content as recorded), ``--set``, ``--iteration``
   and ``--replicated`` (the manifest's ``frontend`` record); a ``flags:`` line says which.
2. ``artifact``: every file and tensor the manifest lists, checksums recomputed and NaN/Inf scanned, read
   tensor by tensor in bounded memory (:mod:`mexc.tools.integrity`); one ``FAIL file: tensor ...`` line per
   finding. A failed artifact stops here (its logits are not compared).
3. ``runtime``: what runs the output, and its memory bound: transformers on the output's weights as stored,
   upcast to float32 one module at a time where the family allows (hf); ONNX Runtime on CPU, whole graph
   (onnx, tensorrt: the engine is not run); for trtllm, mexc's own reader of the TensorRT-LLM checkpoint
   (every rank, TP merged) on mexc's reference interpreter, layer by layer: TensorRT-LLM itself is not
   involved. A trtllm output's replicated tensors must also be identical on every TP rank.
4. ``logits``: prefill logits of ``PROMPTS`` [2, 8] against mexc's reference interpreter on ``--against``, run
   layer by layer (:mod:`mexc.tools.verify_stream`: one node's weights in memory, so a 7B model verifies on a
   24 GB machine); max |delta| within a tolerance chosen from the dtype written, relative to max |reference
   logits| with a floor (:data:`TOLERANCE`; a quantization scheme's absolute bound, :data:`QUANT_TOLERANCE`,
   where larger), and the same top-1 token wherever the reference's top-2 margin exceeds that tolerance.

Exit status: 0 all OK, 1 a FAIL; a combination that cannot be run here is one ``error:`` line.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..backends.base import Backend
from ..backends.registry import BUILTIN, get_backend
from ..errors import BackendError, InputError, MexcError, ToolNotFoundError
from .integrity import Problem, check_artifact, duplicated_kv_mismatches, replicated_mismatches

PROMPTS = torch.tensor([[1, 5, 9, 23, 42, 77, 3, 99], [0, 64, 31, 8, 15, 2, 50, 11]])
# Default bound on max |delta logits|, per dtype written: (relative, absolute floor); the tolerance is
# max(floor, relative * max |reference logits|), so it scales with the model's logits (a tiny model's logits are
# ~0.6 at most: a fixed 0.2 let a model without its sliding window pass). The relative part is 8x the dtype's
# unit roundoff (bfloat16 2**-8, float16 2**-11: IEEE 754 / torch.finfo(dtype).eps / 2) for the rounding of the
# weights and activations through the layers; measured on correct outputs (docs/targets.md, "mexc verify").
TOLERANCE = {"float32": (1e-4, 1e-4), "float16": (8 * 2 ** -11, 2e-3), "bfloat16": (8 * 2 ** -8, 5e-3)}
QUANT_TOLERANCE = {"int8-wo": 5e-2, "int4-wo": 5e-1, "fp8": 5e-1, "fp8-channel": 5e-1}  # absolute: the scheme's
MANIFEST = "mexc-manifest.json"


def read_manifest(out: Path) -> dict:
    """The output's manifest, checked for the keys verify needs; errors name the file."""
    mf = out / MANIFEST
    if not mf.is_file():
        raise InputError(f"{out}: not a mexc output (no {MANIFEST})", hint="give the -o of `mexc compile`")
    try:
        manifest = json.loads(mf.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{mf}: not valid JSON ({e})", hint="the output was damaged; compile it again") from None
    except OSError as e:
        raise InputError(f"{mf}: cannot be read ({e.strerror})") from None
    model = manifest.get("model") if isinstance(manifest, dict) else None
    if not isinstance(model, dict) or not isinstance(manifest.get("target"), str) or \
            not isinstance(model.get("vocab_size"), int) or model["vocab_size"] < 1:
        raise InputError(f"{mf}: lacks target or model.vocab_size", hint="the output was damaged; compile it again")
    from ..backends.base import CHECKSUM

    if manifest.get("checksum") != CHECKSUM:
        raise InputError(f"{mf}: checksums are {manifest.get('checksum')!r}; this mexc checks {CHECKSUM}",
                         hint="compile the output again with this mexc")
    return manifest


def describe_source(src: dict) -> str:
    """``/path (megatron, torch, iteration 10)`` from the manifest's ``source`` record."""
    bits = [str(src[k]) for k in ("source", "format") if src.get(k)]
    if src.get("iteration") is not None:
        bits.append(f"iteration {src['iteration']}")
    return f"{src.get('checkpoint', '(not recorded)')}" + (f" ({', '.join(bits)})" if bits else "")


def same_source(recorded: dict, against: Path, meta: dict) -> bool:
    """Is ``--against`` (lifted, ``meta``) the checkpoint the manifest records? Path (resolved) and iteration."""
    rec = recorded.get("checkpoint")
    if not rec:
        return False
    if Path(rec).resolve() != against.resolve():
        a, b = _iteration_dir(Path(rec), recorded.get("iteration")), _iteration_dir(against, meta.get("iteration"))
        if a is None or a != b:
            return False  # not the same path, nor two spellings of one iteration (the save dir and its iter_ dir)
    return recorded.get("iteration") is None or meta.get("iteration") in (None, recorded["iteration"])


def _iteration_dir(path: Path, iteration) -> Path | None:
    """The real path of the iteration directory ``path`` names (a save dir or an ``iter_*`` dir), or None."""
    import os

    from ..errors import MexcError
    from ..frontends.megatron.reader import locate

    try:
        return Path(os.path.realpath(locate(path, iteration if isinstance(iteration, int) else None)[1]))
    except (MexcError, OSError):
        return None


def compile_flags(manifest: dict) -> tuple[dict, int | None, str]:
    """The compile's lift flags from the manifest's ``frontend`` record (:func:`mexc.driver.frontend_record`):
    (overrides for the lift: ``--config`` fields, then ``--set`` architecture fields, then ``--replicated``;
    ``--iteration`` or None; the flags as one ``--config F --set k=v --iteration N`` text, empty for none).
    Token-id fields of ``--set`` are recorded but do not reach the lift (as at compile time)."""
    from ..frontends.tokenizer import split_overrides

    fe = manifest.get("frontend") if isinstance(manifest.get("frontend"), dict) else {}
    cfg = fe.get("config") if isinstance(fe.get("config"), dict) else {}
    given = fe.get("set") if isinstance(fe.get("set"), dict) else {}
    overrides = {**(cfg.get("fields") or {}), **split_overrides(given)[0]}
    if fe.get("replicated") in ("rank0", "mean"):   # the compile's --replicated
        overrides["replicated"] = fe["replicated"]
    iteration = fe.get("iteration") if isinstance(fe.get("iteration"), int) else None
    words = [f"--config {cfg.get('path')}"] if cfg else []
    words += [f"--set {k}={json.dumps(v, separators=(',', ':'))}" for k, v in given.items()]
    words += [f"--iteration {iteration}"] if iteration is not None else []
    return overrides, iteration, " ".join(words)


def unsupported(manifest: dict) -> str | None:
    """Why the logits of this output cannot be computed on this machine, or None."""
    target, dtype = manifest["target"], manifest["model"].get("dtype")
    if target in ("onnx", "tensorrt") and dtype == "bfloat16":
        return ("a bfloat16 ONNX model does not run on ONNX Runtime's CPU provider (no bfloat16 MatMul kernel); "
                "its checksums and NaN/Inf checks above are all verify can do here")
    if target not in BUILTIN:
        try:
            backend = get_backend(target)
        except MexcError as e:
            return f"target {target!r} is not available here ({e.message})"
        if type(backend).artifact_logits is Backend.artifact_logits:
            return f"the {target} backend ({type(backend).__module__}) gives verify no runtime to compute logits"
    return None


def runtime_line(target: str) -> str:
    """Which runtime computes the output's logits, and its memory bound (hf: said by :func:`artifact_logits`)."""
    if target in ("onnx", "tensorrt"):
        import onnxruntime

        tail = "; the TensorRT engine itself is not run" if target == "tensorrt" else ""
        return (f"onnxruntime {onnxruntime.__version__} (CPU) on model.onnx, whole graph in memory (the output's "
                f"weights, more where the CPU provider converts or prepacks them){tail}")
    return ("mexc's reader of TensorRT-LLM checkpoints (every rank, TP shards merged) on mexc's reference "
            "interpreter, one layer's weights in memory at a time: TensorRT-LLM itself is not involved and no "
            "engine is run")


def artifact_logits(out: Path, manifest: dict, tokens: torch.Tensor, lifted=None) -> tuple[torch.Tensor, str]:
    """Prefill logits ``[b, s, vocab]`` (float32) of the output run by its runtime, and the ``runtime:`` line.

    hf: transformers on the output's weights as stored, streamed module by module where the family allows
    (:func:`mexc.tools.verify_stream.hf_logits`); trtllm: streamed layer by layer through the reference
    interpreter (:func:`mexc.tools.verify_stream.stream_logits`); onnx: onnxruntime on the whole graph."""
    from .verify_stream import TORCH_DTYPES, hf_logits, stream_logits, unmapped

    target = manifest["target"]
    if target == "hf":
        return hf_logits(out, tokens, TORCH_DTYPES.get(manifest["model"].get("dtype"), torch.float32))
    if target in ("onnx", "tensorrt"):
        from ..backends.onnx.runtime import prefill_logits

        return prefill_logits(out, tokens), runtime_line(target)
    if target == "trtllm":
        from ..frontends.trtllm import lift_trtllm

        model = unmapped(lifted if lifted is not None else lift_trtllm(out))  # read, not mapped: bounded RSS
        return stream_logits(model, tokens), runtime_line(target)
    got = get_backend(target).artifact_logits(out, manifest, tokens)   # a plugin target (unsupported() said so)
    if got is None:
        raise InputError(f"verify does not know target {target!r}")
    return got


def tolerance(a, manifest: dict, ref_max: float) -> tuple[float, str]:
    """(max |delta logits| allowed, where that bound comes from) for an output whose reference logits reach
    ``ref_max`` = max |reference logits|: ``--tolerance`` as given, else :data:`TOLERANCE` of the dtype written
    (relative to ``ref_max``, with a floor), raised to :data:`QUANT_TOLERANCE` of a quantization scheme."""
    if a.tolerance is not None:
        return a.tolerance, "--tolerance"
    dtype = manifest["model"].get("dtype") or manifest.get("options", {}).get("dtype") or "float32"  # as written
    rel, floor = TOLERANCE.get(dtype, TOLERANCE["bfloat16"])
    tol, why = max(floor, rel * ref_max), f"{dtype}: max({floor:g}, {rel:.3g} x max |reference logits| {ref_max:.3g})"
    for scheme in re.findall(r"quantize\{scheme=([\w-]+)", str(manifest.get("pipeline", ""))):
        q = QUANT_TOLERANCE.get(scheme, 5e-1)  # weights quantized by a pass: the scheme's error, absolute
        if q > tol:
            tol, why = q, f"{scheme} quantization: {q:g} absolute"
    return tol, why


def top1_check(got: torch.Tensor, ref: torch.Tensor, tol: float) -> tuple[float, int, int]:
    """(top-1 agreement over all positions, positions whose reference top-2 margin exceeds ``tol``, how many of
    those disagree). Where the reference's winner leads by more than the tolerance, the output must pick it."""
    top1 = (got.argmax(-1) == ref.argmax(-1))
    two = ref.topk(min(2, ref.shape[-1]), dim=-1).values
    clear = (two[..., 0] - two[..., -1]) > tol
    return top1.float().mean().item(), int(clear.sum()), int((clear & ~top1).sum())


def ranks_tp(out: Path) -> int:
    return int((json.loads((out / "config.json").read_text()).get("mapping") or {}).get("tp_size", 1))


def check_ranks(out: Path, report) -> tuple:
    """A trtllm output whose files passed :func:`check_artifact`: lift it with mexc's reader (a quantized one
    is refused here, with its reason) and check the copies TP ranks must share. Returns (lifted model,
    problems)."""
    from ..frontends.trtllm import lift_trtllm

    cfg = json.loads((out / "config.json").read_text())  # its mapping was checked with the files
    try:
        problems = duplicated_kv_mismatches(out, report, cfg)
        lifted = lift_trtllm(out)
    except MexcError:
        raise
    except Exception as e:  # noqa: BLE001 - a config.json the checksums do not cover: one line
        raise BackendError(f"{out / 'config.json'}: mexc's TensorRT-LLM reader cannot lift this output "
                           f"({type(e).__name__}: {e})", hint="the config was edited or damaged; compile again"
                           ) from e
    from ..backends.trtllm.classes import by_architecture

    cls = by_architecture(str(cfg.get("architecture")))   # a class's own cross-tensor check (DeepseekV2: absorption)
    own = [Problem(*p) for p in cls.extra.get("check_ranks", lambda o, c: [])(out, cfg)] if cls else []
    return lifted, problems + own + replicated_mismatches(lifted, report, ranks_tp(out))


def verify_output(a) -> int:
    from ..driver import lift

    out = Path(a.out)
    manifest = read_manifest(out)
    target = manifest["target"]
    recorded: dict = manifest["source"] if isinstance(manifest.get("source"), dict) else {}
    result: dict = {"target": target, "source": recorded, "max_abs_delta": None, "top1_agreement": None,
                    "tolerance": None, "ok": False}
    def say(line: str) -> None:
        if not a.json:
            print(line, flush=True)

    def finish(ok: bool) -> int:
        result["ok"] = ok
        if a.json:
            print(json.dumps(result, indent=2))
        return 0 if ok else 1

    say(f"source: {describe_source(recorded)}, as recorded in the manifest")
    overrides, iteration, flags = compile_flags(manifest)   # --against is lifted as the compile lifted its source
    result["compile_flags"] = flags
    if flags:
        say(f"flags: --against is lifted as compiled with {flags}")
    src = lift(a.against, iteration=iteration, overrides=overrides or None)
    same = same_source(recorded, Path(a.against), src.meta)
    result["against"], result["against_is_source"] = str(a.against), same
    if not same:
        say(f"note: --against {a.against} (iteration {src.meta.get('iteration')}) is not the recorded source "
            "(another path or iteration): logits may differ for that reason alone")

    report = check_artifact(out, manifest)
    for p in report.problems:
        say(str(p))
    result["artifact"] = {"files": report.files, "tensors": report.tensors, "bytes": report.bytes,
                          "problems": [str(p) for p in report.problems], "ok": report.ok}
    say(f"artifact: {report.files} file(s), {report.tensors} tensors, {report.bytes / 1e6:.1f} MB: "
        f"checksums ({manifest['checksum']}) and NaN/Inf: {'OK' if report.ok else f'{len(report.problems)} FAIL'}")
    if not report.ok:
        say("logits: not compared (the artifact failed the checks above)")
        return finish(False)
    lifted = None
    if target == "trtllm":
        lifted, ranks = check_ranks(out, report)
        tp = ranks_tp(out)
        for p in ranks:
            say(str(p))
        result["ranks"] = {"tp": tp, "problems": [str(p) for p in ranks], "ok": not ranks}
        if tp > 1:
            say(f"ranks: replicated tensors and shared KV heads are identical on all {tp} TP ranks: "
                f"{'OK' if not ranks else f'{len(ranks)} FAIL'}")
        if ranks:
            say("logits: not compared (the ranks failed the check above)")
            return finish(False)

    why = unsupported(manifest)
    if why:
        result["error"] = why
        if a.json:
            print(json.dumps(result, indent=2))
        raise BackendError(f"{out}: logits not compared: {why}",
                           hint="to compare logits, compile the same model with --dtype float16 or float32")
    try:
        vocab = manifest["model"]["vocab_size"]
        tokens = PROMPTS.clamp(max=vocab - 1)
        got, result["runtime"] = artifact_logits(out, manifest, tokens, lifted)
        got = got[..., :vocab].float()
        say(f"runtime: {result['runtime']}")
    except MexcError:
        raise
    except ImportError as e:
        raise ToolNotFoundError(f"verifying a {target} output needs a runtime that is not installed: {e}",
                         hint="pip install transformers onnxruntime") from None
    except Exception as e:  # noqa: BLE001 - a runtime's own error: one line (--debug shows the traceback)
        msg = (str(e).strip().splitlines() or [""])[-1][:300]
        raise BackendError(f"{out}: the {target} runtime could not run the output ({type(e).__name__}: {msg})",
                           hint="run `mexc --debug verify ...` for the traceback") from e
    from .verify_stream import stream_logits

    ref = stream_logits(src, tokens)[..., :vocab]  # --against, layer by layer (float32 compute)
    if ref.shape != got.shape:
        say(f"FAIL logits: the output gives {list(got.shape)}, --against {a.against} gives {list(ref.shape)}: "
            "they are different models")
        return finish(False)
    ref_max = ref.abs().max().item()
    tol, why = tolerance(a, manifest, ref_max)
    delta = (got - ref).abs().max().item()
    top1, clear, wrong = top1_check(got, ref, tol)
    ok = delta <= tol and not wrong
    result.update(max_abs_delta=delta, top1_agreement=top1, tolerance=tol, tolerance_source=why,
                  reference_max_abs=ref_max, top1_clear_positions=clear, top1_clear_disagree=wrong)
    tail = "" if ok or same else " (--against is not the recorded source)"
    say(f"{target}: max |delta logits| = {delta:.3g} (tolerance {tol:.3g}; {why}), top-1 agreement {top1:.1%} "
        f"({clear - wrong}/{clear} positions whose reference top-2 margin exceeds the tolerance): "
        f"{'OK' if ok else 'FAIL'}{tail}")
    return finish(ok)
