"""Weight-only quantized ONNX for ONNX Runtime's CPU provider (``--target onnx --profile ort --quant ...``).

The model is a bf16 Megatron checkpoint with smooth weights (``mexc.tools.bench_onnx.SmoothFiller``: low-rank
sinusoids plus 5 % noise), so its logits are structured and int4 error is meaningful. Oracles: the reference
executor on the unquantized IR (fp32 truth) and on the quantized IR (the dequantized weights), onnxruntime for
the graphs.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto

ort = pytest.importorskip("onnxruntime")

from mexc.backends.base import CompileOptions  # noqa: E402
from mexc.backends.reference import executor  # noqa: E402
from mexc.driver import compile_checkpoint, lift  # noqa: E402
from mexc.errors import BackendError  # noqa: E402
from mexc.passes import PassManager, parse_pipeline  # noqa: E402
from mexc.passes.pipeline import format_pipeline  # noqa: E402
from mexc.tools.bench_onnx import PRESETS, write_smooth_checkpoint  # noqa: E402

P = PRESETS["tiny"]                     # 2 layers, hidden 128, 4 heads / 2 KV, ffn 352, vocab 1000 (bf16)
EXACT = 1e-4                            # fp32 graph vs the executor (same as test_onnx_backend)
# Errors are relative to the spread of the true logits: max |d| / (max - min) and rms(d) / std. Top-1 agreement
# is not used: neighbouring vocab rows of a smooth lm_head are near-ties (fp16 alone flips 6 % of them).
# int4 (group 32) vs the fp32 truth, measured on this model: max 0.22, rms 0.10 (0.21 / 0.096 with a float
# lm_head; accuracy_level 0 and 4 alike, so the weights' rounding dominates).
INT4 = (0.30, 0.15)
# accuracy_level 4's int8 activations alone (vs the quantized IR, the same int4/int8 weights dequantized):
# measured int4 0.021 / 0.014, int8 0.036 / 0.018
ACT = (0.06, 0.03)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_smooth_checkpoint(P, tmp_path_factory.mktemp("smooth") / "ckpt")


@pytest.fixture(scope="module")
def ids():
    return torch.from_numpy(np.random.default_rng(1).integers(3, P.vocab_size, (2, 32), dtype=np.int64))


_out: dict = {}


def compiled(ckpt, tmp_path_factory, **kw):
    key = tuple(sorted(kw.items()))
    if key not in _out:
        out = tmp_path_factory.mktemp("q") / "out"
        opts = CompileOptions(target="onnx", build="never", vocab_size=P.vocab_size, **kw)
        _out[key] = (out, compile_checkpoint(ckpt, out, opts))
    return _out[key]


def prefill(out, ids: torch.Tensor) -> np.ndarray:
    so = ort.SessionOptions()
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")   # tensorrt profile: exact DQ+MatMul
    sess = ort.InferenceSession(str(out / "model.onnx"), so, providers=["CPUExecutionProvider"])
    b, s = ids.shape
    np_dt = np.float16 if "float16" in sess.get_outputs()[0].type else np.float32
    feed = {"input_ids": ids.numpy(), "attention_mask": np.ones((b, s), np.int64),
            "position_ids": np.tile(np.arange(s, dtype=np.int64), (b, 1))}
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values."):
            feed[i.name] = np.zeros((b, i.shape[1], 0, i.shape[3]), np_dt)
    return sess.run(["logits"], feed)[0].astype(np.float32)


def reference(ckpt, ids, pipeline: str = "") -> np.ndarray:
    m = lift(ckpt)
    PassManager(parse_pipeline(pipeline or "canonicalize,trim-vocab{size=%d}" % P.vocab_size))(m)
    return executor.run(m, ids).numpy()


@pytest.fixture(scope="module")
def truth(ckpt, ids):
    """fp32 logits of the unquantized model (bf16 weights, fp32 compute)."""
    return reference(ckpt, ids)


def within(got, ref, bound) -> bool:
    """max |got - ref| / ptp(ref) and rms(got - ref) / std(ref) both under ``bound`` (a pair)."""
    d = got - ref
    errs = (float(np.abs(d).max() / np.ptp(ref)), float(np.sqrt((d ** 2).mean()) / ref.std()))
    assert errs[0] < bound[0] and errs[1] < bound[1], f"errors {errs} over the bound {bound}"
    return True


def graph(out):
    return onnx.load(str(out / "model.onnx"), load_external_data=False)


def node_attr(n, name):
    return next(onnx.helper.get_attribute_value(a) for a in n.attribute if a.name == name)


# ----------------------------------------------------------------------------------------------- fp32


def test_fp32_exact_vs_reference(ckpt, ids, truth, tmp_path_factory):
    out, _ = compiled(ckpt, tmp_path_factory, dtype="float32")
    assert np.abs(prefill(out, ids) - truth).max() < EXACT


# ----------------------------------------------------------------------------------------------- int4 defaults


def test_int4_on_bf16_checkpoint_is_a_cpu_graph(ckpt, tmp_path_factory):
    out, res = compiled(ckpt, tmp_path_factory, quant="int4-wo")
    assert any("float32" in n and "bfloat16" in n for n in res.notes), res.notes
    m = graph(out)
    io = [*m.graph.input, *m.graph.output]
    assert {v.type.tensor_type.elem_type for v in io if v.name not in ("input_ids", "attention_mask",
                                                                          "position_ids")} == {TensorProto.FLOAT}
    assert not any(t.data_type == TensorProto.BFLOAT16 for t in m.graph.initializer)
    assert not any(n.op_type == "Cast" and node_attr(n, "to") == TensorProto.BFLOAT16 for n in m.graph.node)
    ops = [n.op_type for n in m.graph.node]
    assert ops.count("SkipSimplifiedLayerNormalization") == 2 * P.num_layers   # the residual+norm fusion stays
    nbits = [n for n in m.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 5 * P.num_layers + 1                                  # qkv, o, gate, up, down; lm_head
    assert {node_attr(n, "accuracy_level") for n in nbits} == {4}
    assert any(n.name.startswith("/lm_head/") for n in nbits)
    assert "MatMul" not in ops
    # the manifest's pipeline parses back to itself (the empty exclude list included)
    assert 'exclude=""' in res.pipeline
    assert format_pipeline(parse_pipeline(res.pipeline)) == res.pipeline


def test_int4_within_bound_of_fp32(ckpt, ids, truth, tmp_path_factory):
    out, res = compiled(ckpt, tmp_path_factory, quant="int4-wo")
    got = prefill(out, ids)
    assert within(got, truth, INT4)
    assert within(got, reference(ckpt, ids, res.pipeline), ACT)   # only the int8 activation rounding remains
    assert np.abs(got - truth).max() > 1e-2 * np.ptp(truth)        # the weights really are int4


@pytest.mark.parametrize("quant", ["int4-wo", "int8-wo"])
def test_accuracy_level_0_is_exact_vs_quantized_ir(ckpt, ids, tmp_path_factory, quant):
    out, res = compiled(ckpt, tmp_path_factory, quant=quant, accuracy_level=0)
    assert {node_attr(n, "accuracy_level") for n in graph(out).graph.node if n.op_type == "MatMulNBits"} == {0}
    assert np.abs(prefill(out, ids) - reference(ckpt, ids, res.pipeline)).max() < EXACT


def test_int8_lm_head_quantized_and_within_bound(ckpt, ids, truth, tmp_path_factory):
    out, res = compiled(ckpt, tmp_path_factory, quant="int8-wo")
    nbits = [n for n in graph(out).graph.node if n.op_type == "MatMulNBits"]
    assert {node_attr(n, "bits") for n in nbits} == {8} and any(n.name.startswith("/lm_head/") for n in nbits)
    assert within(prefill(out, ids), reference(ckpt, ids, res.pipeline), ACT)


# ----------------------------------------------------------------------------------------------- options


def test_no_quant_lm_head_keeps_a_float_lm_head(ckpt, ids, truth, tmp_path_factory):
    out, res = compiled(ckpt, tmp_path_factory, quant="int4-wo", quant_lm_head=False)
    assert "exclude=lm_head" in res.pipeline
    lm = [n for n in graph(out).graph.node if n.name.startswith("/lm_head/")]
    assert [n.op_type for n in lm] == ["MatMul"]
    got = prefill(out, ids)
    assert within(got, reference(ckpt, ids, res.pipeline), ACT) and within(got, truth, INT4)


def test_tensorrt_profile_keeps_lm_head_float_by_default(ckpt, ids, tmp_path_factory):
    out, res = compiled(ckpt, tmp_path_factory, quant="int4-wo", profile="tensorrt", dtype="float32")
    assert "exclude=lm_head" in res.pipeline
    assert [n.op_type for n in graph(out).graph.node if n.name.startswith("/lm_head/")] == ["MatMul"]
    assert np.abs(prefill(out, ids) - reference(ckpt, ids, res.pipeline)).max() < EXACT   # int4 DQ packing


def test_fp16_int4_runs_on_cpu(ckpt, ids, truth, tmp_path_factory):
    out, res = compiled(ckpt, tmp_path_factory, quant="int4-wo", dtype="float16")
    m = graph(out)
    assert m.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert "SkipSimplifiedLayerNormalization" in {n.op_type for n in m.graph.node}
    assert not any("bfloat16" in n for n in res.notes), res.notes      # no compute-dtype note
    assert within(prefill(out, ids), truth, INT4)


def test_bf16_dtype_with_quant_refused_for_ort(ckpt, tmp_path):
    with pytest.raises(BackendError) as e:
        compile_checkpoint(ckpt, tmp_path / "o", CompileOptions(target="onnx", quant="int4-wo", dtype="bfloat16",
                                                                 build="never"))
    assert "bfloat16" in str(e.value) and "--dtype float32 or float16" in str(e.value)
    assert not (tmp_path / "o").exists()


def test_cli_options(ckpt, tmp_path, capsys):
    from mexc.tools.cli import main

    rc = main(["compile", str(ckpt), "--target", "onnx", "--quant", "int4-wo", "--accuracy-level", "0",
               "--no-quant-lm-head", "--vocab-size", str(P.vocab_size), "-o", str(tmp_path / "o"), "--quiet"])
    assert rc == 0
    nodes = graph(tmp_path / "o").graph.node
    assert {node_attr(n, "accuracy_level") for n in nodes if n.op_type == "MatMulNBits"} == {0}
    assert [n.op_type for n in nodes if n.name.startswith("/lm_head/")] == ["MatMul"]
    with pytest.raises(SystemExit):
        main(["compile", str(ckpt), "--target", "onnx", "--accuracy-level", "5", "-o", str(tmp_path / "p")])
    assert "accuracy-level" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- bench helpers


def test_smooth_weights_are_smooth_and_scaled():
    from mexc.tools.bench_onnx import SmoothFiller
    from mexc.tools.synth_checkpoint import Filler

    def neighbour_corr(w):   # correlation of horizontally adjacent weights
        w = w.float()
        return float(torch.corrcoef(torch.stack([w[:, :-1].reshape(-1), w[:, 1:].reshape(-1)]))[0, 1])

    w = SmoothFiller(seed=3).tensor((256, 512))
    assert w.dtype == torch.bfloat16 and abs(float(w.float().std()) - 0.02) < 2e-3
    assert neighbour_corr(w) > 0.9 > 0.1 > abs(neighbour_corr(Filler(seed=3, block=1 << 16).tensor((256, 512))))
    norm = SmoothFiller(seed=3).tensor((128,), center=1.0).float()
    assert 0.85 < float(norm.min()) and float(norm.max()) < 1.15


def test_bench_ratio_cancels_the_session_order():
    from mexc.tools.bench_onnx import balanced

    keys = ("prefill_ms_tok", "decode_ms_tok", "prefill_cpu_ms_tok", "decode_cpu_ms_tok")

    def cyc(first, m, o):
        return {"first": first, "mexc": dict.fromkeys(keys, m), "ogb": dict.fromkeys(keys, o)}

    # equal graphs; whichever session is created first runs 20 % slower
    cycles = [cyc("mexc", 12, 10), cyc("ogb", 10, 12), cyc("mexc", 12.1, 10), cyc("ogb", 10, 12.1)]
    r = balanced(cycles)
    assert abs(r["ratio"]["decode_ms_tok"] - 1.0) < 1e-4
    assert r["spread"]["prefill_ms_tok"][0] < 0.85 and r["spread"]["prefill_ms_tok"][1] > 1.15
    # mexc 10 % slower on top of the order effect
    r = balanced([cyc("mexc", 13.2, 10), cyc("ogb", 11, 12)])
    assert abs(r["ratio"]["prefill_ms_tok"] - 1.1) < 1e-9
