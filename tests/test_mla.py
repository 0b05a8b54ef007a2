"""Multi-latent attention (DeepSeek-V2/V3 MLA, dense layers; issue 17) from real megatron-core checkpoints:
fixture kinds ``mla`` (one q projection) and ``mla-q`` (q_lora_rank: q_down -> RMSNorm -> q_up), both with
RMSNorm'd latents (qk_layernorm), YaRN on the decoupled rope (factor 4, mscale 0.7 / mscale_all_dim 0.8, so the
softmax scale is not 1/sqrt(d)) and perturbed norm weights. The reference interpreter (also split over two
simulated TP ranks), transformers' own DeepseekV3ForCausalLM loading the hf output, and onnxruntime running the
onnx output (both profiles, prefill and KV-cache decode steps) reproduce megatron-core's logits within 1e-4 in
fp32; the trtllm target refuses these latent sizes in one line (DeepseekV2ForCausalLM at TensorRT-LLM's 512 / 64:
tests/test_trtllm_deepseek_v2.py)."""

from __future__ import annotations

import json

import pytest
import torch
from family_checks import err, hf_model, onnx_errors
from megatron_fixtures import have_megatron_core, load_reference, megatron_checkpoint

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not have_megatron_core(), reason="megatron-core not installed")

from mexc.backends.base import CompileOptions
from mexc.backends.reference.executor import run
from mexc.driver import compile_checkpoint, lift
from mexc.errors import BackendError

TOL = 1e-4
KINDS = ["mla", "mla-q"]


@pytest.mark.parametrize("kind,tp,fmt", [("mla", 1, "torch"), ("mla-q", 1, "torch"), ("mla-q", 2, "torch"),
                                         ("mla-q", 1, "torch_dist")])
def test_reference_interpreter_matches_megatron(kind, tp, fmt):
    d = megatron_checkpoint(kind, tp=tp, fmt=fmt)
    ref = load_reference(d)
    m = lift(d / "ckpt")
    nodes = list(m.graph.find("mla"))
    assert len(nodes) == 2 and not list(m.graph.find("attention"))
    a = nodes[0].attrs
    assert (a["num_heads"], a["kv_lora_rank"], a["qk_head_dim"], a["qk_rope_dim"], a["v_head_dim"]) == (4, 32, 16, 8, 12)
    assert ("q_down" in nodes[0].params) == (kind == "mla-q") and a["latent_norm"] == "rmsnorm"
    assert a["rope"].scaling == "yarn" and a["rope"].interleaved
    assert err(run(m, ref["tokens"]), ref["logits"]) < 1e-5
    # the softmax scale Megatron derives from mscale_all_dim is what runs: 1/sqrt(d) is measurably wrong
    for n in nodes:
        n.attrs["softmax_scale"] = None
    assert err(run(m, ref["tokens"]), ref["logits"]) > 1e-4


def test_mla_declarations():
    from mexc.ir.ops import params_with, param_spec

    assert {n for op, n in params_with(linear=True) if op == "mla"} == {"q", "q_down", "q_up", "kv_down", "kv_up",
                                                                        "proj"}
    assert {n for op, n in params_with(role="norm") if op == "mla"} == {"q_norm", "kv_norm"}
    splits = {n: param_spec("mla", n).split_dim() for n in ("q", "q_down", "q_up", "kv_down", "kv_up", "proj")}
    assert splits == {"q": 0, "q_down": None, "q_up": 0, "kv_down": None, "kv_up": 0, "proj": 1}


def test_reshard_splits_heads_and_replicates_the_down_projections():
    from mexc.passes import PassManager, parse_pipeline

    d = megatron_checkpoint("mla-q")
    ref = load_reference(d)
    m = lift(d / "ckpt")
    PassManager(parse_pipeline("reshard{tp=2}"))(m)
    n = next(m.graph.find("mla"))
    assert {k: str(p.sharding) for k, p in n.params.items() if k in ("q_down", "kv_down", "q_up", "kv_up", "proj")} \
        == {"q_down": "replicated", "kv_down": "replicated", "q_up": "split(dim=0,tp=2)",
            "kv_up": "split(dim=0,tp=2)", "proj": "split(dim=1,tp=2)"}
    assert err(run(m, ref["tokens"], simulate_ranks=True), ref["logits"]) < 1e-5   # per-rank heads, reduced


@pytest.mark.parametrize("kind", KINDS)
def test_hf_deepseek_v3_matches_megatron(tmp_path, kind):
    d = megatron_checkpoint(kind)
    ref = load_reference(d)
    out = tmp_path / "hf"
    compile_checkpoint(d / "ckpt", out, CompileOptions(target="hf"))
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["architectures"], cfg["model_type"]) == (["DeepseekV3ForCausalLM"], "deepseek_v3")
    assert cfg["first_k_dense_replace"] == cfg["num_hidden_layers"] == 2       # every layer dense
    assert cfg["q_lora_rank"] == (24 if kind == "mla-q" else None) and cfg["rope_interleave"] is True
    assert cfg["rope_parameters"]["rope_type"] == "yarn" and cfg["rope_parameters"]["mscale_all_dim"] == 0.8
    model = hf_model(out, "DeepseekV3ForCausalLM")
    with torch.no_grad():
        assert err(model(ref["tokens"]).logits, ref["logits"]) < TOL


@pytest.mark.parametrize("profile", ["ort", "tensorrt"])
@pytest.mark.parametrize("kind", KINDS)
def test_onnx_prefill_and_decode_match_megatron(tmp_path, kind, profile):
    d = megatron_checkpoint(kind)
    ref = load_reference(d)
    out = tmp_path / "onnx"
    compile_checkpoint(d / "ckpt", out, CompileOptions(target="onnx", profile=profile, build="never"))
    if profile == "ort":
        genai = json.loads((out / "genai_config.json").read_text())["model"]["decoder"]
        assert (genai["head_size"], genai["num_key_value_heads"]) == (24, 4)   # up-projected keys, padded values
    assert onnx_errors(out / "model.onnx", ref, prefix=5).worst < TOL


def test_trtllm_refuses_latent_sizes_its_kernels_lack_in_one_line(tmp_path):
    """DeepseekV2ForCausalLM takes kv_lora_rank 512 / rope 64 only: tests/test_trtllm_deepseek_v2.py writes it."""
    with pytest.raises(BackendError) as e:
        compile_checkpoint(megatron_checkpoint("mla") / "ckpt", tmp_path / "t",
                           CompileOptions(target="trtllm", build="never"))
    assert "multi-latent attention" in str(e.value) and "DeepseekV2ForCausalLM" in str(e.value)
    assert not (tmp_path / "t").exists()


def test_onnx_refuses_quantized_mla_and_inspect_shows_its_sizes(tmp_path, capsys):
    from mexc.tools.cli import main

    with pytest.raises(BackendError, match="multi-latent attention weights are not quantized"):
        compile_checkpoint(megatron_checkpoint("mla") / "ckpt", tmp_path / "o",
                           CompileOptions(target="onnx", quant="int4-wo", group_size=16, build="never"))
    # without --group-size too: the MLA line, not a group size the user never gave (found by QA)
    for quant in ("int8-wo", "int4-wo"):
        assert main(["compile", str(megatron_checkpoint("deepseek-v3") / "ckpt"), "--target", "onnx", "--quant",
                     quant, "-o", str(tmp_path / quant), "--quiet"]) == 1
        err = capsys.readouterr().err
        assert "multi-latent attention weights are not quantized" in err and "group-size" not in err, err
        assert not (tmp_path / quant).exists()
    assert main(["inspect", str(megatron_checkpoint("mla-q") / "ckpt")]) == 0
    assert "heads 4 (kv 4, head_dim 24)" in capsys.readouterr().out


def test_hf_refusals_name_the_class_and_reason():
    from mexc.backends.hf import families

    m = lift(megatron_checkpoint("mla-q") / "ckpt")
    for n in m.graph.find("mla"):
        n.attrs["latent_norm_eps"] = 1e-5               # DeepseekV3RMSNorm's latent norms are fixed at 1e-6
    family, problems = families.classify(m)
    assert family == "deepseek_v3" and any("at eps 1e-05" in p and "DeepseekV3ForCausalLM" in p for p in problems)
    m = lift(megatron_checkpoint("mla-q") / "ckpt")
    for n in m.graph.find("mla"):                       # rope without yarn, Megatron's mscale_all_dim scale kept
        n.attrs["rope"] = type(n.attrs["rope"])(interleaved=True)
    assert any("softmax scale" in p for p in families.classify(m)[1])


def test_arguments_multi_latent_attention_is_honoured():
    from mexc.frontends.megatron import arguments as A

    for name in ("multi_latent_attention", "q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim",
                 "v_head_dim", "rope_type", "rotary_scaling_factor", "mscale", "mscale_all_dim"):
        assert A.BY_NAME[name].verdict == A.HONOURED, name
    assert A.BY_NAME["mla_down_proj_fusion"].verdict == A.REFUSED
