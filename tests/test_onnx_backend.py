"""The ONNX backend (``--target onnx``, profiles ort/tensorrt) and the ``tensorrt`` target, end to end.

Every graph is compiled from a real megatron-core checkpoint and run in onnxruntime (CPU):
prefill logits are compared with megatron-core's own logits, and greedy decode steps fed back through
past/present are compared with the reference executor run on the whole sequence so far.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import onnx
import pytest
import torch

from megatron_fixtures import have_megatron_core, load_reference, megatron_checkpoint

ort = pytest.importorskip("onnxruntime")

from mexc.backends.base import CompileOptions, checksum  # noqa: E402
from mexc.backends.reference import executor  # noqa: E402
from mexc.driver import compile_checkpoint, get_backend, lift  # noqa: E402
from mexc.errors import ToolNotFoundError  # noqa: E402

pytestmark = pytest.mark.skipif(not have_megatron_core(), reason="megatron-core not installed")

ATOL = 1e-4          # fp32, both against megatron-core and against the reference executor
FP16_ATOL = 2e-3     # fp16 graph (fp16 weights and activations) vs fp32 logits; measured <= 4.5e-4
DECODE_STEPS = 8

# Ops the TensorRT ONNX parser imports natively (onnx-tensorrt docs/operators.md, TensorRT 10.15 table;
# RMSNormalization / RotaryEmbedding need 10.15+, Attention 10.14+, with the restrictions the tensorrt
# profile respects: 4-D Q/K/V/mask, no past/present on the Attention node). Nothing from com.microsoft.
TRT_PARSER_OPS = {
    "Add", "And", "Attention", "Cast", "Concat", "Constant", "DequantizeLinear", "Div", "Equal", "Erf", "Expand",
    "Gather", "LayerNormalization", "LessOrEqual", "MatMul", "Mul", "Pow", "RMSNormalization", "Range",
    "ReduceMean", "ReduceSum", "Relu", "Reshape", "RotaryEmbedding", "Shape", "Sigmoid", "Slice", "Softmax",
    "Split", "Sqrt", "Squeeze", "Sub", "Tanh", "TopK", "Transpose", "Unsqueeze", "Where",
}

CASES = [("llama", 2), ("mqa", 1), ("gpt", 1)]
EXTRA_CASES = [("qwen", 1), ("moe", 1)]   # partial rotary + qkv bias; MoE routing


# ----------------------------------------------------------------------------------------------- helpers
_compiled: dict = {}
_lifted: dict = {}


def compiled(tmp_path_factory, kind, tp, profile, dtype=None, quant=None, target="onnx"):
    key = (kind, tp, profile, dtype, quant, target)
    if key not in _compiled:
        d = megatron_checkpoint(kind, tp=tp)
        out = tmp_path_factory.mktemp(f"{kind}-tp{tp}-{profile}-{dtype}-{quant}-{target}") / "out"
        # accuracy_level 0: MatMulNBits computes exactly what the quantized IR means (level 4's int8 activations
        # are bounded in test_onnx_quant.py)
        opts = CompileOptions(target=target, profile=profile, dtype=dtype, quant=quant, build="never",
                              accuracy_level=0)
        res = compile_checkpoint(d / "ckpt", out, opts)
        _compiled[key] = (d, out, res)
    return _compiled[key]


def reference_model(kind, tp, pipeline=""):
    key = (kind, tp, pipeline)
    if key not in _lifted:
        from mexc.passes import PassManager, parse_pipeline

        m = lift(megatron_checkpoint(kind, tp=tp) / "ckpt")
        if pipeline:
            PassManager(parse_pipeline(pipeline))(m)
        _lifted[key] = m
    return _lifted[key]


class Decoder:
    """Drives the emitted graph through onnxruntime: prefill, then one token at a time through past/present."""

    def __init__(self, path):
        so = ort.SessionOptions()
        # ORT fuses DequantizeLinear(int4)+MatMul into MatMulNBits with int8 activations (accuracy level 4)
        # by default; level 0 keeps the graph's exact fp32 semantics
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
        self.sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.past_inputs = {i.name: i for i in self.sess.get_inputs() if i.name.startswith("past_key_values.")}
        self.out_names = [o.name for o in self.sess.get_outputs()]
        t = self.sess.get_outputs()[0].type
        self.np_dtype = np.float16 if "float16" in t else np.float32

    def step(self, ids: np.ndarray, past: dict | None, past_len: int):
        b, s = ids.shape
        feed = {"input_ids": ids.astype(np.int64),
                "attention_mask": np.ones((b, past_len + s), np.int64),
                "position_ids": np.tile(np.arange(past_len, past_len + s), (b, 1)).astype(np.int64)}
        for name, i in self.past_inputs.items():
            feed[name] = past[name] if past else np.zeros((b, i.shape[1], 0, i.shape[3]), self.np_dtype)
        outs = dict(zip(self.out_names, self.sess.run(None, feed)))
        new_past = {n: outs[n.replace("past_key_values.", "present.")] for n in self.past_inputs}
        return outs["logits"].astype(np.float32), new_past


# ----------------------------------------------------------------------------------------------- prefill


@pytest.mark.parametrize("profile", ["ort", "tensorrt"])
@pytest.mark.parametrize("kind,tp", CASES + EXTRA_CASES)
def test_prefill_matches_megatron(tmp_path_factory, kind, tp, profile):
    d, out, res = compiled(tmp_path_factory, kind, tp, profile)
    ref = load_reference(d)
    logits, _ = Decoder(out / "model.onnx").step(ref["tokens"].numpy(), None, 0)
    V = logits.shape[-1]
    assert V == 100 and logits.shape[:2] == tuple(ref["tokens"].shape)
    err = np.abs(logits - ref["logits"][..., :V].numpy()).max()
    assert err < ATOL, f"{kind}/{profile}: max |onnx - megatron| = {err}"


# ----------------------------------------------------------------------------------------------- decode


@pytest.mark.parametrize("profile", ["ort", "tensorrt"])
@pytest.mark.parametrize("kind,tp", CASES)
def test_greedy_decode_through_kv_cache(tmp_path_factory, kind, tp, profile):
    d, out, _ = compiled(tmp_path_factory, kind, tp, profile)
    model = reference_model(kind, tp)
    dec = Decoder(out / "model.onnx")
    ids = load_reference(d)["tokens"].numpy()
    logits, past = dec.step(ids, None, 0)
    V = logits.shape[-1]
    seq = ids
    for step in range(DECODE_STEPS):
        nxt = logits[:, -1].argmax(-1)[:, None]
        seq = np.concatenate([seq, nxt], 1)
        logits, past = dec.step(nxt, past, seq.shape[1] - 1)
        assert logits.shape == (seq.shape[0], 1, V)
        for k, v in past.items():
            assert v.shape[2] == seq.shape[1], k
        want = executor.run(model, torch.from_numpy(seq))[:, -1:, :V].numpy()
        err = np.abs(logits - want).max()
        assert err < ATOL, f"{kind}/{profile} decode step {step}: max |onnx - reference| = {err}"


# ----------------------------------------------------------------------------------------------- fp16


@pytest.mark.parametrize("profile", ["ort", "tensorrt"])
@pytest.mark.parametrize("kind,tp", [("llama", 2), ("gpt", 1)])
def test_fp16(tmp_path_factory, kind, tp, profile):
    d, out, _ = compiled(tmp_path_factory, kind, tp, profile, dtype="float16")
    m = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert m.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert all(t.data_type in (onnx.TensorProto.FLOAT16, onnx.TensorProto.INT64, onnx.TensorProto.FLOAT)
               for t in m.graph.initializer)
    ref = load_reference(d)
    dec = Decoder(out / "model.onnx")
    logits, past = dec.step(ref["tokens"].numpy(), None, 0)
    err = np.abs(logits - ref["logits"][..., :100].numpy()).max()
    assert err < FP16_ATOL, f"fp16 {kind}/{profile}: {err}"
    # one decode step through the fp16 cache stays close to the fp32 reference
    seq = np.concatenate([ref["tokens"].numpy(), logits[:, -1].argmax(-1)[:, None]], 1)
    logits, _ = dec.step(seq[:, -1:], past, seq.shape[1] - 1)
    want = executor.run(reference_model(kind, tp), torch.from_numpy(seq))[:, -1:, :100].numpy()
    assert np.abs(logits - want).max() < FP16_ATOL


# ----------------------------------------------------------------------------------------------- structure


@pytest.mark.parametrize("profile", ["ort", "tensorrt"])
def test_checker_full_and_external_data(tmp_path_factory, profile):
    d, out, res = compiled(tmp_path_factory, "llama", 2, profile)
    onnx.checker.check_model(str(out / "model.onnx"), full_check=True)
    files = sorted(p.name for p in out.iterdir())
    assert "model.onnx" in files and "model.onnx.data" in files
    assert ("genai_config.json" in files) == (profile == "ort")
    m = onnx.load(str(out / "model.onnx"), load_external_data=False)
    data = (out / "model.onnx.data").read_bytes()
    manifest = json.loads((out / "mexc-manifest.json").read_text())
    sums = manifest["files"]["model.onnx.data"]
    n_ext, end = 0, 0
    for t in m.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            assert len(t.raw_data) + 8 * len(t.int64_data) <= 1024, f"{t.name} is inline and large"
            continue
        n_ext += 1
        info = {e.key: e.value for e in t.external_data}
        assert info["location"] == "model.onnx.data"          # one data file
        off, n = int(info["offset"]), int(info["length"])
        assert off >= end, "external tensors overlap"
        assert off + n <= len(data)
        assert checksum(data[off:off + n]) == sums[t.name]
        end = max(end, off + n)
    assert n_ext == res.emit.tensors == len(sums)
    # every weight of the IR is in the data file, and the proto itself holds no weight bytes
    assert (out / "model.onnx").stat().st_size < 64 * 1024
    # I/O contract
    ins = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in m.graph.input}
    assert ins["input_ids"] == ["batch_size", "sequence_length"]
    assert ins["attention_mask"] == ["batch_size", "total_sequence_length"]
    assert ins["position_ids"] == ["batch_size", "sequence_length"]
    assert ins["past_key_values.1.value"] == ["batch_size", 2, "past_sequence_length", 16]
    outs = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in m.graph.output}
    assert outs["logits"] == ["batch_size", "sequence_length", 100]
    assert outs["present.0.key"] == ["batch_size", 2, "total_sequence_length", 16]


@pytest.mark.parametrize("kind,tp", CASES + EXTRA_CASES)
def test_tensorrt_profile_uses_only_parser_ops(tmp_path_factory, kind, tp):
    _, out, _ = compiled(tmp_path_factory, kind, tp, "tensorrt")
    m = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert {o.domain for o in m.opset_import} <= {"", "ai.onnx"}
    assert not [n for n in m.graph.node if n.domain not in ("", "ai.onnx")]
    ops = {n.op_type for n in m.graph.node}
    assert not ops - TRT_PARSER_OPS, f"not importable by TensorRT's parser: {sorted(ops - TRT_PARSER_OPS)}"
    for n in m.graph.node:
        if n.op_type == "Attention":   # TRT: no past/present on Attention, 4 inputs, one output
            assert len(n.input) == 4 and len(n.output) == 1
    onnx.checker.check_model(str(out / "model.onnx"), full_check=True)


def test_ort_profile_uses_contrib_ops(tmp_path_factory):
    _, out, _ = compiled(tmp_path_factory, "llama", 2, "ort")
    m = onnx.load(str(out / "model.onnx"), load_external_data=False)
    ops = {(n.domain, n.op_type) for n in m.graph.node}
    assert ("com.microsoft", "GroupQueryAttention") in ops
    assert ("com.microsoft", "SkipSimplifiedLayerNormalization") in ops
    gqa = [n for n in m.graph.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == 2 and all(n.input[1] == "" and n.input[2] == "" for n in gqa)   # packed QKV
    assert all({a.name: a.i for a in n.attribute}["do_rotary"] == 1 for n in gqa)      # fused RoPE
    # partial rotary (qwen) cannot be fused: explicit com.microsoft RotaryEmbedding, do_rotary=0
    _, out, _ = compiled(tmp_path_factory, "qwen", 1, "ort")
    m = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert ("com.microsoft", "RotaryEmbedding") in {(n.domain, n.op_type) for n in m.graph.node}
    cfg = json.loads((out / "genai_config.json").read_text())
    assert cfg["model"]["decoder"]["num_key_value_heads"] == 2
    assert cfg["model"]["decoder"]["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert cfg["search"]["past_present_share_buffer"] is True


# ----------------------------------------------------------------------------------------------- quantization


@pytest.mark.parametrize("quant", ["int4-wo", "int8-wo"])
@pytest.mark.parametrize("profile", ["ort", "tensorrt"])
def test_weight_only_quant(tmp_path_factory, quant, profile):
    d, out, res = compiled(tmp_path_factory, "llama", 2, profile, quant=quant)
    m = onnx.load(str(out / "model.onnx"), load_external_data=False)
    ops = {n.op_type for n in m.graph.node}
    assert ("MatMulNBits" if profile == "ort" else "DequantizeLinear") in ops
    model = reference_model("llama", 2, res.pipeline)     # the quantized IR; the executor dequantizes
    ids = load_reference(d)["tokens"]
    logits, _ = Decoder(out / "model.onnx").step(ids.numpy(), None, 0)
    want = executor.run(model, ids)[..., :100].numpy()
    err = np.abs(logits - want).max()
    assert err < ATOL, f"{quant}/{profile}: {err}"


# ----------------------------------------------------------------------------------------------- tensorrt target


@pytest.fixture
def no_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)   # import tensorrt -> ImportError


def test_tensorrt_target_without_tensorrt(tmp_path, no_tensorrt):
    d = megatron_checkpoint("llama", tp=2)
    res = compile_checkpoint(d / "ckpt", tmp_path / "a", CompileOptions(target="tensorrt", build="auto"))
    assert (tmp_path / "a" / "model.onnx").is_file() and not (tmp_path / "a" / "model.plan").exists()
    notes = [n for n in res.notes if "trtexec" in n]
    assert len(notes) == 1 and "\n" not in notes[0] and "TensorRT is not installed" in notes[0]
    cmd = notes[0][notes[0].index("trtexec"):]
    assert f"--onnx={tmp_path / 'a' / 'model.onnx'}" in cmd and "--saveEngine=" in cmd
    for flag in ("--minShapes=", "--optShapes=", "--maxShapes="):
        assert flag + "input_ids:1x" in cmd or flag + "input_ids:" in cmd
    assert "past_key_values.0.key:1x2x0x16" in cmd and "past_key_values.1.value:8x2x2047x16" in cmd
    m = onnx.load(str(tmp_path / "a" / "model.onnx"), load_external_data=False)
    assert not [n for n in m.graph.node if n.domain == "com.microsoft"]   # the tensorrt profile, always

    with pytest.raises(ToolNotFoundError) as e:
        compile_checkpoint(d / "ckpt", tmp_path / "b", CompileOptions(target="tensorrt", build="always"))
    assert "trtexec --onnx=" in (e.value.hint or "")
    assert not (tmp_path / "b").exists()  # refused before any work


def test_both_backends_registered():
    assert get_backend("onnx").name == "onnx"
    assert get_backend("tensorrt").name == "tensorrt"
    assert get_backend("onnx").build is not get_backend("tensorrt").build


# ----------------------------------------------------------------------------------------------- genai


def test_onnxruntime_genai_greedy(tmp_path_factory):
    og = pytest.importorskip("onnxruntime_genai")
    d, out, _ = compiled(tmp_path_factory, "llama", 2, "ort")
    model = reference_model("llama", 2)
    prompt = load_reference(d)["tokens"][:1]                    # [1, 8]
    new = 8
    # greedy with the reference executor (full recompute each step)
    seq = prompt.clone()
    for _ in range(new):
        nxt = executor.run(model, seq)[:, -1, :100].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    m = og.Model(str(out))
    params = og.GeneratorParams(m)
    params.set_search_options(do_sample=False, max_length=prompt.shape[1] + new)
    gen = og.Generator(m, params)
    gen.append_tokens(prompt[0].tolist())
    while not gen.is_done():
        gen.generate_next_token()
    got = list(gen.get_sequence(0))
    want = seq[0].tolist()
    # genai stops early only at eos; compare the common prefix and require it to be the full run or end at eos
    assert got[: len(want)] == want[: len(got)], (got, want)
    assert len(got) == len(want) or got[-1] == json.loads((out / "genai_config.json").read_text())["model"]["eos_token_id"]


# ----------------------------------------------------------------------------------------------- synthetic IR


def synthetic_model(*, layers=2, H=64, nh=4, nkv=2, d=16, F=96, V=80, rope=None, qk_norm="none",
                    activation="silu", gated=True, softmax_scale=None, zero_centered=False, emb_scale=1.0,
                    norm="rmsnorm", seed=7):
    """A small decoder built straight in the IR over a RandomStore (fresh tensors on every read)."""
    from mexc import ir

    store = ir.RandomStore("r", seed=seed, std=0.2)
    cfg = ir.ModelConfig("llama", H, layers, V, max_position_embeddings=64)
    b = ir.Builder(cfg, stores={"r": store})

    def w(key, *shape, layout=None):
        return ir.load(store, key, ir.TensorType(ir.f32, tuple(shape), layout))

    def nparams(key):
        ps = {"weight": w(f"{key}.norm", H)}
        if norm == "layernorm":
            ps["bias"] = w(f"{key}.bias", H)
        return ps

    nattr = dict(kind=norm, eps=1e-5, zero_centered=zero_centered)
    x = b.node("embedding", b.input_ids, params={"word": w("emb", V, H)}, scale=emb_scale)
    lay = ir.QKVLayout("grouped", nh, nkv, d)
    for i in range(layers):
        h = b.node("norm", x, layer=i, params=nparams(f"l{i}.in"), **nattr)
        ps = {"qkv": w(f"l{i}.qkv", (nh + 2 * nkv) * d, H, layout=lay),
              "qkv_bias": w(f"l{i}.qkv_b", (nh + 2 * nkv) * d, layout=lay), "proj": w(f"l{i}.proj", H, nh * d)}
        if qk_norm != "none":
            ps.update(q_norm=w(f"l{i}.q_norm", d), k_norm=w(f"l{i}.k_norm", d))
        a = b.node("attention", h, layer=i, params=ps, num_heads=nh, num_kv_heads=nkv, head_dim=d,
                   position="rope" if rope is not None else "none", rope=rope or ir.Rope(), qk_norm=qk_norm,
                   softmax_scale=softmax_scale)
        x = b.node("add", x, a, layer=i)
        h = b.node("norm", x, layer=i, params=nparams(f"l{i}.post"), **nattr)
        mp = {"gate": w(f"l{i}.gate", F, H), "up": w(f"l{i}.up", F, H)} if gated else {"fc1": w(f"l{i}.fc1", F, H)}
        m = b.node("mlp", h, layer=i, params={**mp, "fc2": w(f"l{i}.fc2", H, F)}, activation=activation,
                   gated=gated)
        x = b.node("add", x, m, layer=i)
    x = b.node("norm", x, params=nparams("final"), **nattr)
    return b.output(b.node("lm_head", x, params={"weight": w("head", V, H)}))


def emit_ir(model, out, profile, **opts):
    from mexc.passes import PassManager, parse_pipeline

    be = get_backend("onnx")
    o = CompileOptions(target="onnx", profile=profile, **opts)
    PassManager(parse_pipeline(be.legalize_pipeline(o, model)))(model)
    assert be.check(model, o) == []
    return be.emit(model, out, o)


SYNTH = {
    "interleaved-rope+qk-norm": dict(rope="interleaved", qk_norm="rmsnorm"),
    "llama3-rope+d32+scale": dict(rope="llama3", nh=2, nkv=1, d=32, softmax_scale=0.3, activation="gelu-tanh"),
    "partial-rope+layernorm+zero-centered": dict(rope="partial", norm="layernorm", zero_centered=True,
                                                 emb_scale=8.0, gated=False, activation="squared-relu"),
    "no-position+quick-gelu": dict(activation="quick-gelu"),
    "interleaved-rope-fused-in-gqa": dict(rope="interleaved"),
}


def _rope(name):
    from mexc.ir import Rope

    return {None: None, "interleaved": Rope(base=500.0, interleaved=True),
            "llama3": Rope(base=10000.0, scaling="llama3", factor=8.0, original_max_positions=16),
            "partial": Rope(percent=0.5)}[name]


@pytest.mark.parametrize("profile", ["ort", "tensorrt"])
@pytest.mark.parametrize("variant", sorted(SYNTH))
def test_synthetic_variants_prefill_and_decode(tmp_path, variant, profile):
    kw = dict(SYNTH[variant])
    kw["rope"] = _rope(kw.get("rope"))
    ref = synthetic_model(**kw)
    emit_ir(synthetic_model(**kw), tmp_path, profile)
    dec = Decoder(tmp_path / "model.onnx")
    seq = np.random.default_rng(0).integers(0, 80, (2, 5))
    logits, past = dec.step(seq, None, 0)
    err = np.abs(logits - executor.run(ref, torch.from_numpy(seq)).numpy()).max()
    assert err < ATOL, f"prefill {variant}/{profile}: {err}"
    for step in range(3):
        seq = np.concatenate([seq, logits[:, -1].argmax(-1)[:, None]], 1)
        logits, past = dec.step(seq[:, -1:], past, seq.shape[1] - 1)
        want = executor.run(ref, torch.from_numpy(seq))[:, -1:].numpy()
        assert np.abs(logits - want).max() < ATOL, f"decode {step} {variant}/{profile}"


# ----------------------------------------------------------------------------------------------- streaming


def test_weights_are_streamed_one_at_a_time(tmp_path, monkeypatch):
    """At every write to model.onnx.data, at most a couple of materialized weights are alive (the emitter
    materializes, writes and drops each weight; it never holds the model's weights at once)."""
    import gc
    import weakref

    from mexc.backends.onnx import graph as onnx_graph
    from mexc.ir.tensors import Recipe

    live: list = []
    orig_materialize, orig_add = Recipe.materialize, onnx_graph.ExternalData.add

    def materialize(self, cache=None):
        t = orig_materialize(self, cache)
        live.append(weakref.ref(t))
        return t

    peak = []

    def add(self, name, t, *a, **kw):
        gc.collect()
        # tensors materialized from the IR that are still referenced (views of the one being written count once)
        alive = {id(r()) for r in live if r() is not None}
        peak.append(len(alive))
        return orig_add(self, name, t, *a, **kw)

    monkeypatch.setattr(Recipe, "materialize", materialize)
    monkeypatch.setattr(onnx_graph.ExternalData, "add", add)
    model = synthetic_model(layers=4)
    n_params = sum(1 for _ in model.graph.params())
    res = emit_ir(model, tmp_path, "ort")
    assert res.tensors >= n_params and len(peak) == res.tensors
    assert max(peak) <= 3, f"live materialized tensors while writing: {peak}"


def test_bf16_tensorrt_profile_is_valid_onnx(tmp_path_factory):
    """bf16 cannot run on ORT CPU (no kernels); the graph must still be valid ONNX with bf16 weights and I/O."""
    _, out, _ = compiled(tmp_path_factory, "llama", 2, "tensorrt", dtype="bfloat16")
    onnx.checker.check_model(str(out / "model.onnx"), full_check=True)
    m = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert m.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.BFLOAT16
    assert {t.data_type for t in m.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL} == \
        {onnx.TensorProto.BFLOAT16}


def test_check_rejects_what_it_cannot_lower():
    be = get_backend("onnx")
    m = reference_model("llama", 2)
    assert be.check(m, CompileOptions(target="onnx")) == []
    assert any("single-device" in p for p in be.check(m, CompileOptions(target="onnx", tp=2)))
    assert any("fp8" in p for p in be.check(m, CompileOptions(target="onnx", quant="fp8")))
    assert any("power-of-two" in p for p in be.check(m, CompileOptions(target="onnx", quant="int4-wo", group_size=48)))
