"""Every built-in pass: semantics (reference logits before == after), golden text, nothing-to-do, text round trip."""

import pytest
import torch

from megatron_fixtures import load_reference, megatron_checkpoint
from mexc import ir
from mexc.backends.reference.executor import run
from mexc.errors import PassError
from mexc.frontends.megatron import lift
from mexc.passes import PassManager, parse_pipeline


def apply(model, text):
    pm = PassManager(parse_pipeline(text))
    pm(model)
    return pm.results


def roundtrip(model):
    again = ir.parse(str(model))
    assert str(again) == str(model)
    return again


def fixture(kind, tp=1, pp=1, fmt="torch"):
    d = megatron_checkpoint(kind, tp=tp, pp=pp, fmt=fmt)
    return lift(d / "ckpt"), load_reference(d)


def err(a, b):
    return (a - b).abs().max().item()


# ----------------------------------------------------------------------------------------- relayout / fuse / split


def test_relayout_qkv_semantics_golden_and_noop():
    model, ref = fixture("llama", tp=2)
    res = apply(model, "relayout-qkv{to=concat}")
    assert res[0][1].modified and res[0][1].stats == {"relayout": 2}
    attn = model.node("attention", 0)
    assert str(attn.params["qkv"].type) == "f32[128,64] qkv:concat(q=4,kv=2,d=16)"
    assert str(attn.params["qkv"].source).startswith("regroup_qkv(tag_qkv(concat(load(ckpt, \"mp_rank_00:")
    assert err(run(roundtrip(model), ref["tokens"]), ref["logits"]) < 1e-5
    again = apply(model, "relayout-qkv{to=concat}")
    assert not again[0][1].modified
    apply(model, "relayout-qkv{to=megatron}")
    assert attn.params["qkv"].type.layout.kind == "grouped"
    assert err(run(model, ref["tokens"]), ref["logits"]) < 1e-5


def test_split_and_fuse_qkv_with_biases():
    model, ref = fixture("qwen", tp=2)
    apply(model, "split-qkv")
    attn = model.node("attention", 1)
    assert {"q", "k", "v", "q_bias", "k_bias", "v_bias"} <= set(attn.params)
    assert attn.params["k"].type.shape == (32, 64)
    assert err(run(roundtrip(model), ref["tokens"]), ref["logits"]) < 1e-5
    res = apply(model, "fuse-qkv")
    assert res[0][1].stats == {"fused": 2}
    assert attn.params["qkv"].type.layout.kind == "concat"
    assert err(run(model, ref["tokens"]), ref["logits"]) < 1e-5
    assert not apply(model, "fuse-qkv")[0][1].modified


# ----------------------------------------------------------------------------------------- reshard

RESHARD_CASES = [
    # (kind, source tp, source pp, format, pipeline, expected parallel)
    ("llama", 2, 1, "torch", "reshard{tp=1}", (1, 1)),
    ("llama", 1, 1, "torch", "relayout-qkv{to=concat},reshard{tp=4}", (4, 1)),     # 2 KV heads -> replicated
    ("mqa", 1, 1, "torch", "relayout-qkv{to=concat},reshard{tp=2}", (2, 1)),       # MQA to TP2
    ("llama", 1, 2, "torch", "reshard{pp=1}", (1, 1)),                            # PP2 -> PP1
    ("mqa", 1, 2, "torch", "relayout-qkv{to=concat},reshard{tp=2 pp=3}", (2, 3)),  # uneven PP (4 layers)
    ("gpt", 2, 2, "torch", "relayout-qkv{to=concat},reshard{tp=1 pp=3}", (1, 3)),  # TP2xPP2 -> TP1xPP3 (2 layers: error)
    ("gpt", 2, 2, "torch_dist", "relayout-qkv{to=concat},reshard{tp=4 pp=2}", (4, 2)),
    ("moe", 1, 1, "torch", "relayout-qkv{to=concat},reshard{tp=2 ep=2}", (2, 1)),
    ("moe", 1, 1, "torch", "relayout-qkv{to=concat},reshard{tp=2}", (2, 1)),
]


@pytest.mark.parametrize("kind,tp,pp,fmt,pipe,want", RESHARD_CASES, ids=lambda v: str(v))
def test_reshard_per_rank_simulation_matches_megatron(kind, tp, pp, fmt, pipe, want):
    model, ref = fixture(kind, tp, pp, fmt)
    if want[1] > model.config.num_layers:
        with pytest.raises(PassError) as e:
            apply(model, pipe)
        assert "exceeds the" in e.value.message and "reshard" in e.value.message
        return
    apply(model, pipe)
    assert (model.parallel.tp, model.parallel.pp) == want
    model = roundtrip(model)
    got = run(model, ref["tokens"], simulate_ranks=True)
    assert err(got[..., :128], ref["logits"]) < 1e-5


def test_uneven_pp_follows_trtllm_rule():
    model, _ = fixture("mqa", 1, 1)
    apply(model, "reshard{pp=3}")
    stages = {n.layer: n.stage for n in model.graph.nodes if n.layer is not None}
    assert stages == {0: 0, 1: 0, 2: 1, 3: 2}
    assert model.node("embedding").stage == 0 and model.node("lm_head").stage == 2


def test_reshard_split_then_merge_gives_the_original_bytes():
    model, _ = fixture("llama", 1, 1)
    apply(model, "relayout-qkv{to=concat},reshard{tp=4}")  # includes KV replication
    for node, name, p in model.graph.params():
        full = p.source.materialize()
        if p.sharding.replicated:
            continue
        shards = [ir.derive("shard", p.source, dim=p.sharding.dim, parts=4, index=r).materialize() for r in range(4)]
        if name == "qkv":
            d, lay = 16, p.type.layout
            qs = [s[: d] for s in shards]                  # 1 query head per rank
            ks = [s[d: 2 * d] for s in shards]             # KV head r // 2 (replicated pairs)
            vs = [s[2 * d:] for s in shards]
            assert torch.equal(ks[0], ks[1]) and torch.equal(ks[2], ks[3])
            merged = torch.cat(qs + [ks[0], ks[2]] + [vs[0], vs[2]])
            assert lay.kv_heads == 2
        else:
            merged = torch.cat(shards, p.sharding.dim)
        assert torch.equal(merged, full), f"{node.location} {name}"


def test_reshard_refuses_impossible_layouts():
    model, _ = fixture("llama", 1, 1)
    with pytest.raises(PassError) as e:
        apply(model, "reshard{tp=3}")
    assert "reshard" in e.value.message and "do not split over tp=3" in e.value.message
    model, _ = fixture("llama", 1, 1)
    with pytest.raises(PassError) as e:
        apply(model, "reshard{tp=4}")  # grouped QKV: 2 groups over 4 ranks
    assert "relayout-qkv{to=concat}" in e.value.message


def test_reshard_pads_vocab_for_target_tp():
    model, ref = fixture("llama", 1, 1)
    tokens = ref["tokens"] % 98
    apply(model, "trim-vocab{size=98}")
    want = run(model, tokens)
    apply(model, "relayout-qkv{to=concat},reshard{tp=4}")
    assert model.node("lm_head").params["weight"].type.shape[0] == 100
    got = run(model, tokens, simulate_ranks=True)
    assert got.shape[-1] == 100 and err(got[..., :98], want) < 1e-5
    assert torch.all(got[..., 98:] == 0)


def test_reshard_nothing_to_do():
    model, _ = fixture("llama", 1, 1)
    assert not apply(model, "reshard{tp=1 pp=1}")[0][1].modified


# ----------------------------------------------------------------------------------------- dtype / quantize


def test_lower_dtype_bf16_keeps_norms_fp32_on_request():
    model, ref = fixture("moe", 1, 1)
    res = apply(model, "lower-dtype{to=bf16 keep-norms-fp32=true}")
    assert res[0][1].modified
    assert all(n.params["weight"].type.dtype == ir.f32 for n in model.graph.find("norm"))
    assert model.node("moe", 0).params["router"].type.dtype == ir.f32
    assert model.node("moe", 0).params["fc2"].type.dtype == ir.bf16
    roundtrip(model)
    got = run(model, ref["tokens"])
    rel = err(got, ref["logits"]) / ref["logits"].abs().max().item()
    assert rel < 2e-2  # stated tolerance for bf16 weights
    assert not apply(model, "lower-dtype{to=bf16 keep-norms-fp32=true}")[0][1].modified


# stated tolerances: max |delta logits| relative to max |logits|
QUANT_TOL = {"int8-wo": 1e-2, "int4-wo": 2.5e-1, "fp8": 1e-1, "fp8-channel": 1e-1}


@pytest.mark.parametrize("scheme,group", [("int8-wo", 0), ("int4-wo", 0), ("int4-wo", 32), ("fp8", 0),
                                          ("fp8-channel", 0)])
def test_quantize_dequantized_logits_within_tolerance(scheme, group):
    model, ref = fixture("llama", 2, 1)
    res = apply(model, f"quantize{{scheme={scheme} group-size={group}}}")
    assert res[0][1].stats["quantized"] == 2 * 5  # qkv, proj, gate, up, fc2 per layer; lm_head excluded
    attn = model.node("attention", 0)
    assert attn.params["qkv"].type.dtype in (ir.i8, ir.i4, ir.f8e4m3)
    assert "qkv_scale" in attn.params
    model = roundtrip(model)
    got = run(model, ref["tokens"])
    rel = err(got, ref["logits"]) / ref["logits"].abs().max().item()
    assert rel < QUANT_TOL[scheme], rel
    assert not apply(model, f"quantize{{scheme={scheme} group-size={group}}}")[0][1].modified


def test_quantized_weights_shard_with_their_scales():
    model, ref = fixture("llama", 1, 1)
    apply(model, "relayout-qkv{to=concat},quantize{scheme=int8-wo},reshard{tp=2}")
    assert model.node("attention", 0).params["qkv_scale"].sharding == ir.Sharding(0, 2)
    assert model.node("attention", 0).params["proj_scale"].sharding.replicated  # per-row scale of a row-parallel
    one = run(model, ref["tokens"], simulate_ranks=False)
    two = run(model, ref["tokens"], simulate_ranks=True)
    assert err(one, two) < 1e-5


# ----------------------------------------------------------------------------------------- canonicalize / dce


def test_canonicalize_folds_zero_centered_gamma():
    model, ref = fixture("gpt", 1, 1)
    for n in model.graph.find("norm"):  # express the same model with zero-centered gammas (w - 1)
        n.attrs["zero_centered"] = True
        n.params["weight"].source = ir.derive("add_scalar", n.params["weight"].source, value=-1.0)
    before = run(model, ref["tokens"])
    assert err(before, ref["logits"]) < 1e-5
    res = apply(model, "canonicalize")
    assert res[0][1].stats["folded"] == 5
    assert err(run(roundtrip(model), ref["tokens"]), ref["logits"]) < 1e-5
    assert not apply(model, "canonicalize")[0][1].modified


def test_canonicalize_untie_and_tie():
    model, ref = fixture("gpt", 1, 1)
    assert model.node("lm_head").attrs["tied"]
    apply(model, "canonicalize{untie=true}")
    assert not model.node("lm_head").attrs["tied"]
    apply(model, "canonicalize{tie=true}")
    assert model.node("lm_head").attrs["tied"]
    assert err(run(model, ref["tokens"]), ref["logits"]) < 1e-5


def test_dce_removes_dead_nodes_only():
    model, ref = fixture("llama", 1, 1)
    assert not apply(model, "dce")[0][1].modified
    x = model.node("embedding").output
    model.graph.insert_after(model.node("embedding"), ir.Node("add", [x, x], layer=None))
    res = apply(model, "dce")
    assert res[0][1].stats == {"removed": 1}
    assert err(run(model, ref["tokens"]), ref["logits"]) < 1e-5


def test_trim_vocab():
    model, ref = fixture("gpt", 1, 1)
    apply(model, "trim-vocab{size=100}")
    assert model.config.vocab_size == 100
    got = run(roundtrip(model), ref["tokens"])
    assert got.shape[-1] == 100 and err(got, ref["logits"][..., :100]) < 1e-5
    with pytest.raises(PassError):
        apply(model, "trim-vocab{size=500}")


@pytest.mark.parametrize("scheme,group", [("int8-wo", 0), ("int4-wo", 16), ("fp8", 0)])
def test_qkv_format_passes_carry_quantization_scales(scheme, group):
    model, ref = fixture("llama", 2, 1)
    apply(model, f"quantize{{scheme={scheme} group-size={group}}}")
    want = run(model, ref["tokens"])
    apply(model, "relayout-qkv{to=concat}")
    assert model.node("attention", 0).params["qkv_scale"].type.layout in (None, model.node("attention", 0).params["qkv"].type.layout)
    assert err(run(roundtrip(model), ref["tokens"]), want) < 1e-5
    apply(model, "split-qkv")
    assert {"q_scale", "k_scale", "v_scale"} <= set(model.node("attention", 1).params)
    assert err(run(model, ref["tokens"]), want) < 1e-5
