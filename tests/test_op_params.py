"""Declared op params (mexc.ir.ops): the rules derived from them, and the verifier's attribute <-> param and
enum checks."""

import pytest
from mexc import ir
from mexc.errors import IRError, ParseError
from mexc.ir.ops import absent_shape, param_spec, params_with
from mexc.passes import PassManager, parse_pipeline
from mexc.passes.quantize import LINEAR_WEIGHTS
from mexc.passes.reshard import split_of
from tiny_models import random_llama

H, HEADS, KV, D = 64, 4, 2, 16


def small():
    return random_llama(hidden=H, layers=2, vocab=128, ffn=128, heads=HEADS, kv=KV)


def with_qk_norm(model, kind):
    """Give every attention q/k norm weights [head_dim] and set ``qk_norm=kind``."""
    st = model.stores["rnd"]
    for n in model.graph.find("attention"):
        n.attrs["qk_norm"] = kind
        for k in ("q_norm", "k_norm"):
            n.params[k] = ir.Param(ir.load(st, f"{n.layer}.{k}", ir.TensorType(ir.f32, (D,))))
    return model


def tiny_moe(E=4, F=32):
    st = ir.RandomStore("rnd", seed=2)

    def w(key, *shape):
        return ir.load(st, key, ir.TensorType(ir.f32, shape))

    cfg = ir.ModelConfig(family="mixtral", hidden_size=H, num_layers=1, vocab_size=128)
    b = ir.Builder(cfg, stores={"rnd": st})
    x = b.node("embedding", b.input_ids, params={"word": w("emb", 128, H)})
    h = b.node("norm", x, layer=0, params={"weight": w("n0", H)})
    y = b.node("moe", h, layer=0, num_experts=E, top_k=2, gated=True,
               params={"router": w("r", E, H), "gate": w("g", E, F, H), "up": w("u", E, F, H),
                       "fc2": w("f", E, H, F)})
    x = b.node("add", x, y, layer=0)
    x = b.node("norm", x, params={"weight": w("nf", H)})
    return b.output(b.node("lm_head", x, params={"weight": w("head", 128, H)}))


# ---------------------------------------------------------------------------------------------- derived rules


def test_derived_rules_reproduce_the_tables_they_replace():
    # the tables reshard / quantize / lower-dtype held before the params were declared
    # (the mamba op came later, issue 18: tests/test_mamba.py checks its declarations; mla, issue 17: test_mla.py)
    # (the attention output gate came later, issue 17: column-parallel like q, tests/test_output_gate.py)
    assert {w for w in LINEAR_WEIGHTS if w[0] not in ("mamba", "mla")} == {
        ("attention", n) for n in ("qkv", "q", "k", "v", "proj", "gate")} | {
        (op, n) for op in ("mlp", "moe") for n in ("gate", "up", "fc1", "fc2")} | {("lm_head", "weight")} | {
        ("moe", "shared_" + n) for n in ("gate", "up", "fc1", "fc2")}   # issue 17: the shared expert, an MLP
    old_tp = {("attention", n): 0 for n in ("qkv", "qkv_bias", "q", "k", "v", "q_bias", "k_bias", "v_bias")}
    old_tp |= {("attention", "proj"): 1, ("mlp", "fc2"): 1, ("lm_head", "weight"): 0}
    old_tp |= {("moe", "shared_gate"): 0, ("moe", "shared_up"): 0, ("moe", "shared_fc1"): 0, ("moe", "shared_fc2"): 1}
    old_tp |= {("mlp", n): 0 for n in ("gate", "up", "fc1", "gate_bias", "up_bias", "fc1_bias")}
    old_tp |= {("attention", n): 0 for n in ("gate", "gate_bias")}
    old_tp |= {("attention", "sinks"): 0}   # issue 17 (gpt-oss): one sink per head, split with the heads
    declared = {(op, p.name) for op, s in ir.OPS.items() for p in s.params if op not in ("mamba", "mla")}
    moe_biases = ("gate_bias", "up_bias", "fc1_bias", "fc2_bias", "router_bias")   # issue 17 (gpt-oss)
    for op, name in declared - {("moe", n) for n in ("gate", "up", "fc1", "fc2", *moe_biases)}:
        assert split_of(op, name) == (old_tp.get((op, name)), "tp"), (op, name)
    for name, tp_dim in {"gate": 1, "up": 1, "fc1": 1, "fc2": 2, "gate_bias": 1, "up_bias": 1, "fc1_bias": 1,
                         "fc2_bias": None}.items():
        assert split_of("moe", name) == (tp_dim, "tp")
        assert split_of("moe", name, ep=2) == (0, "ep")
    assert split_of("moe", "router", ep=2) == (None, "tp")
    assert split_of("embedding", "word") == (None, "tp")
    assert split_of("embedding", "word", parallel_embedding=True) == (0, "tp")
    assert {p for p in params_with(role="norm") if p[0] != "mla"} == {
        ("norm", "weight"), ("norm", "bias"), ("attention", "q_norm"), ("attention", "k_norm")}
    assert params_with(role="router") == {("moe", "router"), ("moe", "expert_bias"), ("moe", "router_bias")}
    assert param_spec("attention", "proj_scale") is None


def test_reshard_with_experts_follows_the_declared_roles():
    m = tiny_moe()
    PassManager(parse_pipeline("reshard{tp=2 ep=2}"))(m)
    moe = m.node("moe")
    assert {k: str(p.sharding) for k, p in moe.params.items()} == {
        "router": "replicated", "gate": "split(dim=0,ep=2)", "up": "split(dim=0,ep=2)",
        "fc2": "split(dim=0,ep=2)"}
    m = tiny_moe()
    PassManager(parse_pipeline("reshard{tp=2}"))(m)
    assert {k: p.sharding.dim for k, p in m.node("moe").params.items()} == {
        "router": None, "gate": 1, "up": 1, "fc2": 2}
    assert str(m.node("lm_head").params["weight"].sharding) == "split(dim=0,tp=2)"
    assert m.node("embedding").params["word"].sharding.replicated


def test_lower_dtype_keeps_qk_norms_fp32_with_the_norms():
    m = with_qk_norm(small(), "rmsnorm")
    ir.verify(m)
    PassManager(parse_pipeline("lower-dtype{to=bf16 keep-norms-fp32=true}"))(m)
    a = m.node("attention", 0)
    assert a.params["q_norm"].type.dtype == ir.f32 and a.params["k_norm"].type.dtype == ir.f32
    assert a.params["qkv"].type.dtype == ir.bf16
    assert next(m.graph.find("norm")).params["weight"].type.dtype == ir.f32


def test_absent_shapes_come_from_the_shape_rules():
    m = small()
    cfg = m.config
    a, mlp, emb = m.node("attention", 0), m.node("mlp", 0), m.node("embedding")
    norm = next(m.graph.find("norm"))
    assert absent_shape(a, "q_bias", cfg) == (HEADS * D,)
    assert absent_shape(a, "k_bias", cfg) == (KV * D,)
    assert absent_shape(a, "qkv_bias", cfg) == ((HEADS + 2 * KV) * D,)
    assert absent_shape(a, "proj_bias", cfg) == (H,)
    assert absent_shape(mlp, "gate_bias", cfg) == (128,)  # F from fc2 [H, F]
    assert absent_shape(mlp, "fc2_bias", cfg) == (H,)
    assert absent_shape(norm, "bias", cfg) == (H,)
    assert absent_shape(emb, "position", cfg) == (cfg.max_position_embeddings, H)
    assert absent_shape(a, "nonsense", cfg) is None


# ---------------------------------------------------------------------------------------------- the verifier


def test_qk_norm_none_with_norm_weights_is_an_error_naming_node_and_fix():
    m = with_qk_norm(small(), "rmsnorm")
    ir.verify(m)
    m.node("attention", 1).attrs["qk_norm"] = "none"
    with pytest.raises(IRError) as e:
        ir.verify(m)
    msg = e.value.message
    assert "node 8 (attention, layer 1): param 'q_norm' needs qk_norm='layernorm' or 'rmsnorm', but " \
           "qk_norm='none'" in msg
    assert "set qk_norm='layernorm'" in msg and "or drop the param" in msg
    assert "k_norm" in msg and "layer 0" not in msg


def test_qk_norm_without_weights_is_missing_them():
    m = small()
    m.node("attention", 0).attrs["qk_norm"] = "layernorm"
    msg = "\n".join(ir.problems(m))
    assert "node 2 (attention, layer 0): missing param 'q_norm' (expected shape [16]; required by " \
           "qk_norm='layernorm')" in msg


@pytest.mark.parametrize("op, attr, bad", [
    ("attention", "qk_norm", "bogus"),
    ("norm", "kind", "batchnorm"),
    ("mlp", "activation", "swish"),
    ("attention", "position", "learned"),
    ("moe", "score", "softplus"),
    ("moe", "activation", "tanh"),
])
def test_unknown_attribute_values_are_rejected(op, attr, bad):
    m = tiny_moe() if op == "moe" else small()
    node = next(m.graph.find(op))
    node.attrs[attr] = bad
    msg = "\n".join(ir.problems(m))
    assert f"{node.location}: attribute {attr}={bad!r} is not one of" in msg
    # and it survives the text form as the same error
    assert f"attribute {attr}={bad!r} is not one of" in "\n".join(ir.problems(ir.parse(str(m))))


def test_unknown_rope_scaling_and_qkv_layout_are_rejected():
    m = small()
    a = m.node("attention", 0)
    a.attrs["rope"] = ir.Rope(scaling="dynamic")
    want = "attribute rope has scaling='dynamic', not one of none, linear, llama3, yarn"
    assert any(want in p for p in ir.problems(m))
    text = str(small()).replace("qkv:grouped(", "qkv:bogus(", 1)
    with pytest.raises((ParseError, IRError)) as e:
        ir.parse(text)
    assert "bogus" in e.value.message


def test_mixed_fused_and_separate_qkv_and_stray_params_are_rejected():
    m = small()
    a = m.node("attention", 0)
    a.params["q"] = ir.Param(ir.load(m.stores["rnd"], "q", ir.TensorType(ir.f32, (HEADS * D, H))))
    a.params["up"] = ir.Param(ir.load(m.stores["rnd"], "g", ir.TensorType(ir.f32, (H,))))
    msg = "\n".join(ir.problems(m))
    assert "param 'q' (separate) mixed with fused params: keep one form" in msg
    assert "unexpected params ['up']" in msg
    m = small()
    mlp = m.node("mlp", 0)
    mlp.params["fc1"] = mlp.params.pop("gate")
    msg = "\n".join(ir.problems(m))
    assert "param 'fc1' needs gated=False, but gated=True" in msg and "missing param 'gate'" in msg


def test_rmsnorm_bias_and_bad_shapes_name_the_declared_rule():
    m = small()
    n = next(m.graph.find("norm"))
    n.params["bias"] = ir.Param(ir.load(m.stores["rnd"], "b", ir.TensorType(ir.f32, (H,))))
    assert any("param 'bias' needs kind='layernorm', but kind='rmsnorm'" in p for p in ir.problems(m))
    n.attrs["kind"] = "layernorm"
    assert not ir.problems(m)
    m.node("mlp", 1).params["up"] = ir.Param(ir.load(m.stores["rnd"], "u", ir.TensorType(ir.f32, (100, H))))
    assert any("param 'up' has shape [100, 64], expected [128, 64]" in p for p in ir.problems(m))
    short = ir.load(m.stores["rnd"], "h", ir.TensorType(ir.f32, (100, H)))
    m.node("lm_head").params["weight"] = ir.Param(short)
    assert any("lm_head has 100 rows, fewer than vocab_size=128" in p for p in ir.problems(m))
