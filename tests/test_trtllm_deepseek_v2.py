"""TensorRT-LLM DeepseekV2ForCausalLM (issue 17) from real megatron-core MLA checkpoints (fixture kinds ``mla-512``:
one q projection, and ``mla-q-512``: q_lora_rank; DeepSeek-V2's latent sizes, the only ones TensorRT-LLM's MLA
kernels take; RMSNorm'd latents, YaRN on the decoupled rope with mscale_all_dim, so the softmax scale is not
1/sqrt(d)): ``--target trtllm`` at tp 1 / tp 2 / pp 2, read back by the test-side reader
written from TensorRT-LLM's sources (tests/trtllm_reader_deepseek_v2.py), whose logits reproduce megatron-core's
within 1e-4 in fp32 both as the engine's generation step computes them (the absorbed ``fused_q_proj``) and as its
context phase does (``q_b_proj`` / ``kv_b_proj``); settings the class cannot express are refused in one line.
MoE (kinds ``deepseek-v2``: layer 0 dense, default softmax router, ungated shared expert, scaled; and
``deepseek-v2-group``: pre-softmax group-limited routing): the same at tp 1 / tp 2 / tp 2 x ep 2 / pp 2, the
reader running MixtureOfExperts' routing and SharedMoE as TensorRT-LLM's sources do."""

from __future__ import annotations

import json

import pytest
import torch
from family_checks import err
from megatron_fixtures import have_megatron_core, load_reference, megatron_checkpoint
from safetensors.torch import load_file, save_file

pytestmark = pytest.mark.skipif(not have_megatron_core(), reason="megatron-core not installed")

import trtllm_reader  # noqa: E402
import trtllm_reader_deepseek_v2 as dsv2  # noqa: E402

from mexc.backends.base import CompileOptions  # noqa: E402
from mexc.driver import compile_checkpoint, get_backend, lift  # noqa: E402
from mexc.errors import BackendError  # noqa: E402
from mexc.tools.cli import main  # noqa: E402

TOL = 1e-4


def _compile(tmp_path, kind, tp=1, pp=1):
    d = megatron_checkpoint(kind)
    out = tmp_path / f"{kind}-tp{tp}-pp{pp}"
    compile_checkpoint(d / "ckpt", out, CompileOptions(target="trtllm", tp=tp, pp=pp, build="never"))
    return d, out


@pytest.mark.parametrize("kind,tp,pp", [("mla-512", 1, 1), ("mla-512", 2, 1), ("mla-q-512", 1, 1),
                                        ("mla-q-512", 2, 1), ("mla-q-512", 1, 2)])
def test_deepseek_v2_read_back_matches_megatron(tmp_path, kind, tp, pp):
    d, out = _compile(tmp_path, kind, tp, pp)
    ref = load_reference(d)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"] == "DeepseekV2ForCausalLM" and cfg["num_key_value_heads"] == 1
    assert (cfg["kv_lora_rank"], cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]) == \
        (512, 128, 64, 128)
    assert cfg["head_size"] == 512 + 64 and (cfg["q_lora_rank"] is None) == (kind == "mla-512")
    assert cfg["rotary_scaling"]["type"] == "yarn" and cfg["rotary_scaling"]["mscale_all_dim"] == 0.8
    assert cfg["moe"]["num_experts"] == 0 and cfg["mapping"]["tp_size"] == tp and cfg["mapping"]["pp_size"] == pp
    tokens = torch.as_tensor(ref["tokens"])
    assert err(trtllm_reader.logits(str(out), tokens), ref["logits"]) < TOL        # generation: fused_q_proj
    assert err(dsv2.logits(str(out), tokens, phase="context"), ref["logits"]) < TOL
    # per rank: the rank's heads of q_b / kv_b / fused_q_proj / dense, everything else replicated
    t = load_file(str(out / "rank0.safetensors"))
    a = "transformer.layers.0.attention."
    assert t[a + "fused_q_proj"].shape == (4 // tp * (512 + 64), 24 if kind == "mla-q-512" else 64)
    assert t[a + "kv_b_proj"].shape == (4 // tp * (128 + 128), 512) and t[a + "dense.weight"].shape == (64, 4 // tp * 128)


def test_fused_q_proj_is_the_absorbed_query_the_generation_step_runs(tmp_path):
    """Corrupting one head of fused_q_proj changes what the engine's generation step computes, not its context
    phase: the reader runs the absorbed weights, and mexc writes them consistent with q_b_proj / kv_b_proj."""
    d, out = _compile(tmp_path, "mla-q-512", tp=2)
    ref = load_reference(d)
    tokens = torch.as_tensor(ref["tokens"])
    f = out / "rank1.safetensors"
    t = load_file(str(f))
    name = "transformer.layers.1.attention.fused_q_proj"
    t[name][:512] *= -4.0               # rank 1's first head, latent rows
    save_file(t, str(f), metadata={"format": "pt"})
    assert err(dsv2.logits(str(out), tokens, phase="context"), ref["logits"]) < TOL
    assert err(dsv2.logits(str(out), tokens, phase="generation"), ref["logits"]) > 1e-3


def test_reader_rejects_what_the_loader_would(tmp_path):
    _, out = _compile(tmp_path, "mla-512")
    f = out / "rank0.safetensors"
    t = load_file(str(f))
    t["transformer.layers.0.attention.qkv.weight"] = torch.zeros(4, 64)   # a name DeepseekV2Attention lacks
    save_file(t, str(f), metadata={"format": "pt"})
    with pytest.raises(AssertionError, match="provided but not required.*qkv"):
        dsv2.read_checkpoint(str(out))
    cfg = json.loads((out / "config.json").read_text())
    del cfg["rotary_scaling"]["beta_fast"]
    assert any("rotary_scaling" in p for p in dsv2.check_config(cfg))
    assert any("512 / rope 64 only" in p for p in dsv2.check_config(dict(cfg, kv_lora_rank=256)))


def _refusals(mutate) -> list[str]:
    m = lift(megatron_checkpoint("mla-q-512") / "ckpt")
    for n in m.graph.find("mla"):
        mutate(n)
    return get_backend("trtllm").check(m, CompileOptions(target="trtllm"))


@pytest.mark.parametrize("mutate,match", [
    (lambda n: n.attrs.update(latent_norm_eps=1e-5), "latent norms rmsnorm at eps 1e-05"),
    (lambda n: n.attrs.update(softmax_scale=0.1), "softmax scale of 0.1"),
    (lambda n: n.attrs.update(latent_norm="layernorm"), "latent norms layernorm"),
])
def test_refusals_name_the_class_and_reason(mutate, match):
    problems = _refusals(mutate)
    assert len(problems) == 1 and match in problems[0] and "DeepseekV2ForCausalLM" in problems[0]
    assert "\n" not in problems[0]


def test_quantized_mla_refused_in_one_line(tmp_path, capsys):
    d = megatron_checkpoint("mla-512")
    with pytest.raises(BackendError, match="weight-only quantization of multi-latent attention"):
        compile_checkpoint(d / "ckpt", tmp_path / "q", CompileOptions(target="trtllm", quant="int8-wo", build="never"))
    assert not (tmp_path / "q").exists()
    capsys.readouterr()
    rc = main(["compile", str(d / "ckpt"), "--target", "trtllm", "--quant", "int8-wo", "--build", "never",
               "-o", str(tmp_path / "t")])
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert rc != 0 and len(lines) == 1 and "DeepseekV2ForCausalLM" in lines[0]


@pytest.mark.parametrize("tensor,expect", [
    ("transformer.layers.1.attention.fused_q_proj", "is not the absorption of this rank's q_b_proj"),
    ("transformer.layers.0.attention.kv_b_proj", "FAIL"),
])
def test_verify_reads_deepseek_v2_and_finds_corruption(tmp_path, capsys, tensor, expect):
    """`mexc verify` lifts the output with mexc's reader (the context-phase tensors) and checks each rank's
    fused_q_proj against them; a corrupted absorbed query (which only the engine's generation steps would run)
    or a corrupted kv_b_proj fails."""
    from test_trtllm_backend import corrupt_scale

    d, out = _compile(tmp_path, "mla-q-512", tp=2)
    assert main(["verify", str(out), "--against", str(d / "ckpt")]) == 0, capsys.readouterr().out
    assert "OK" in capsys.readouterr().out
    corrupt_scale(out, "rank1.safetensors", tensor, 1.5)
    assert main(["verify", str(out), "--against", str(d / "ckpt")]) == 1
    assert expect in capsys.readouterr().out


def test_bf16_tp2_pp2_reads_back_and_verifies(tmp_path, capsys):
    """bf16 at tp 2 x pp 2 (four ranks; layer 1 on the second stage, renumbered 0): fused_q_proj is absorbed from
    the fp32 source and rounded once, so both phases stay within bf16 rounding of megatron-core's fp32 logits."""
    d = megatron_checkpoint("mla-q-512")
    out = tmp_path / "bf16"
    compile_checkpoint(d / "ckpt", out, CompileOptions(target="trtllm", tp=2, pp=2, dtype="bfloat16", build="never"))
    assert load_file(str(out / "rank3.safetensors"))["transformer.layers.0.attention.fused_q_proj"].dtype == \
        torch.bfloat16
    ref = load_reference(d)
    tokens = torch.as_tensor(ref["tokens"])
    for phase in ("generation", "context"):
        assert err(dsv2.logits(str(out), tokens, phase=phase), ref["logits"]) < 2e-2
    assert main(["verify", str(out), "--against", str(d / "ckpt")]) == 0, capsys.readouterr().out


def test_latent_sizes_the_kernels_lack_are_refused_in_one_line(tmp_path, capsys):
    """kv_lora_rank 32 / rope 8 / nope 16 != v 12 (the ``mla`` kind) would load into DeepseekV2ForCausalLM and run
    wrong in TensorRT-LLM's 512 / 64 MLA kernels: refused, naming the sizes and the kernel."""
    d = megatron_checkpoint("mla")
    with pytest.raises(BackendError, match="kv_lora_rank 32, qk_pos_emb_head_dim 8.*512 and rope 64 only"):
        compile_checkpoint(d / "ckpt", tmp_path / "s", CompileOptions(target="trtllm", build="never"))
    assert not (tmp_path / "s").exists()
    capsys.readouterr()
    rc = main(["compile", str(d / "ckpt"), "--target", "trtllm", "--build", "never", "-o", str(tmp_path / "t")])
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert rc != 0 and len(lines) == 1 and "applyMLARopeAndAssignQKVKernel" in lines[0]


def test_parallel_embedding_refused(tmp_path):
    """DeepseekV2Model builds Embedding(vocab_size, hidden_size) without a TP split: a split table would not load."""
    with pytest.raises(BackendError, match="--parallel-embedding is not expressible with DeepseekV2ForCausalLM"):
        compile_checkpoint(megatron_checkpoint("mla-512") / "ckpt", tmp_path / "p",
                           CompileOptions(target="trtllm", tp=2, parallel_embedding=True, build="never"))


# ------------------------------------------------------------------ MoE layers (DeepSeek-V2's MOE / SharedMoE)
# deepseek-v2: layer 0 dense, layer 1 MoE (top-2 of 4, Megatron's default softmax router, x 2.5, ungated shared
# expert); deepseek-v2-group: pre-softmax top-3 of 8 within the best 2 of 4 groups, x 2.0 (group_limited_greedy)
@pytest.mark.parametrize("kind,tp,ep,pp", [("deepseek-v2", 1, 1, 1), ("deepseek-v2", 2, 1, 1), ("deepseek-v2", 2, 2, 1),
                                           ("deepseek-v2", 1, 1, 2), ("deepseek-v2-group", 1, 1, 1),
                                           ("deepseek-v2-group", 2, 2, 1)])
def test_deepseek_v2_moe_read_back_matches_megatron(tmp_path, kind, tp, ep, pp):
    d = megatron_checkpoint(kind)
    out = tmp_path / "o"
    compile_checkpoint(d / "ckpt", out, CompileOptions(target="trtllm", tp=tp, ep=ep, pp=pp, build="never"))
    ref = load_reference(d)
    tokens = torch.as_tensor(ref["tokens"])
    cfg = json.loads((out / "config.json").read_text())
    group = kind == "deepseek-v2-group"
    E, k, F, S = (8, 3, 16, 32) if group else (4, 2, 32, 64)
    assert cfg["first_k_dense_replace"] == 1 and cfg["intermediate_size"] == 128 and cfg["moe_inter_size"] == F
    assert cfg["topk_method"] == ("group_limited_greedy" if group else "greedy")
    want = {"num_experts": E, "top_k": k, "normalization_mode": 3 if group else 1, "shared_expert_intermediate_size": S}
    if group:   # the scaling factor is folded into the experts' proj (fold-moe-scaling)
        want.update(device_limited_n_group=4, device_limited_topk_group=2, device_limited_routed_scaling_factor=1.0)
    assert cfg["moe"] == want and cfg["mapping"]["moe_ep_size"] == ep and cfg["mapping"]["moe_tp_size"] == tp // ep
    for phase in ("generation", "context"):
        assert err(dsv2.logits(str(out), tokens, phase=phase), ref["logits"]) < TOL
    assert err(trtllm_reader.logits(str(out), tokens), ref["logits"]) < TOL
    t = load_file(str(out / f"rank{tp * pp - 1}.safetensors"))
    moe = f"transformer.layers.{0 if pp == 2 else 1}.mlp."
    assert t[moe + "router.weight"].dtype == torch.float32 and t[moe + "router.weight"].shape == (E, 64)
    assert t[moe + "fc.weight"].shape == (E // ep, 2 * F // (tp // ep), 64)
    assert t[moe + "shared_expert.fc.weight"].shape == (2 * S // tp, 64) and moe + "shared_expert_gate.weight" not in t
    if pp == 1:
        dense = load_file(str(out / "rank0.safetensors"))["transformer.layers.0.mlp.gate.weight"]
        assert dense.shape == (128 // tp, 64)


def test_group_limited_routing_is_what_matches(tmp_path):
    """The reader's routing is TensorRT-LLM's, and the group limit bites on this fixture: the same checkpoint read
    with plain pre-softmax top-3 (NONE) or renormalized (DEVICE_LIMITED_RENORM) is off megatron-core's logits."""
    d = megatron_checkpoint("deepseek-v2-group")
    out = tmp_path / "g"
    compile_checkpoint(d / "ckpt", out, CompileOptions(target="trtllm", build="never"))
    ref = load_reference(d)
    tokens = torch.as_tensor(ref["tokens"])
    cfg, ranks = dsv2.read_checkpoint(str(out))
    assert err(dsv2.forward(cfg, ranks, tokens), ref["logits"]) < TOL
    for mode in (0, 4):
        c = json.loads(json.dumps(cfg))
        c["moe"]["normalization_mode"] = mode
        assert err(dsv2.forward(c, ranks, tokens), ref["logits"]) > 5e-4


@pytest.mark.parametrize("tensor", ["transformer.layers.1.mlp.proj.weight",
                                    "transformer.layers.1.mlp.shared_expert.fc.weight"])
def test_verify_reads_deepseek_v2_moe_and_finds_a_corrupted_expert(tmp_path, capsys, tensor):
    from test_trtllm_backend import corrupt_scale

    d = megatron_checkpoint("deepseek-v2-group")
    out = tmp_path / "v"
    compile_checkpoint(d / "ckpt", out, CompileOptions(target="trtllm", tp=2, ep=2, build="never"))
    assert main(["verify", str(out), "--against", str(d / "ckpt")]) == 0, capsys.readouterr().out
    assert "OK" in capsys.readouterr().out
    corrupt_scale(out, "rank1.safetensors", tensor, 1.5)
    assert main(["verify", str(out), "--against", str(d / "ckpt")]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_moe_checkpoint_layouts_the_model_does_not_build_are_rejected(tmp_path, capsys):
    """first_k_dense_replace other than 1: the model builds layer 0 dense, convert.py the MoE from that layer on."""
    d = megatron_checkpoint("deepseek-v2")
    out = tmp_path / "f"
    compile_checkpoint(d / "ckpt", out, CompileOptions(target="trtllm", build="never"))
    cfg = json.loads((out / "config.json").read_text())
    assert any("first_k_dense_replace must be 1" in p for p in dsv2.check_config(dict(cfg, first_k_dense_replace=2)))
    (out / "config.json").write_text(json.dumps(dict(cfg, first_k_dense_replace=2)))
    capsys.readouterr()
    assert main(["verify", str(out), "--against", str(d / "ckpt")]) != 0
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "first_k_dense_replace 2" in lines[0]


def _moe_refusals(kind, mutate) -> list[str]:
    from mexc.backends.lowering import make_pass
    from mexc.passes.infra import PassManager

    m = PassManager([make_pass("fold-moe-scaling")])(lift(megatron_checkpoint(kind) / "ckpt"))
    for n in m.graph.find("moe"):
        mutate(n)
    return get_backend("trtllm").check(m, CompileOptions(target="trtllm"))


@pytest.mark.parametrize("kind,mutate,match", [
    ("deepseek-v2", lambda n: n.attrs.update(shared_expert="sigmoid-gated"), "SharedMoE(use_shared_gate=False)"),
    ("deepseek-v2-group", lambda n: n.attrs.update(top_k=4), "sum of their best 2 scores"),
    ("deepseek-v2", lambda n: n.attrs.update(score="sigmoid"), "score='sigmoid'"),
    ("deepseek-v2", lambda n: n.attrs.update(activation="gelu"), "SwiGLU experts only"),
])
def test_moe_refusals_name_the_class_and_reason(kind, mutate, match):
    problems = _moe_refusals(kind, mutate)
    assert len(problems) == 1 and match in problems[0] and "DeepseekV2ForCausalLM" in problems[0]
    assert "\n" not in problems[0]


@pytest.mark.parametrize("kind,match", [("deepseek-v2-all-moe", "dense (non-MoE) layers none"),
                                        ("deepseek-v3", "score='sigmoid' and expert bias")])
def test_moe_layouts_and_v3_routing_refused_in_one_line(tmp_path, capsys, kind, match):
    """MoE on layer 0 too (the class builds it dense) and DeepSeek-V3's sigmoid / expert-bias router: one error
    line each, nothing written."""
    d = megatron_checkpoint(kind)
    rc = main(["compile", str(d / "ckpt"), "--target", "trtllm", "--build", "never", "-o", str(tmp_path / "t")])
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert rc != 0 and len(lines) == 1 and match in lines[0] and "DeepseekV2ForCausalLM" in lines[0]
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize("kind,profile", [("deepseek-v2", "ort"), ("deepseek-v2-group", "tensorrt")])
def test_onnx_of_the_deepseek_v2_moe_fixtures_matches_megatron(tmp_path, kind, profile):
    """The same fixtures through --target onnx (MLA as plain attention after up-projection, the softmax / group-limited
    routing lowered): prefill and KV-cache decode steps reproduce megatron-core's logits."""
    from family_checks import onnx_errors

    d = megatron_checkpoint(kind)
    compile_checkpoint(d / "ckpt", tmp_path / "onnx", CompileOptions(target="onnx", profile=profile, build="never"))
    assert onnx_errors(tmp_path / "onnx" / "model.onnx", load_reference(d), prefix=5).worst < TOL
