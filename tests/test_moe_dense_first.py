"""Dense layers among MoE layers (issue 17, Megatron ``moe_layer_freq`` as a list) from real megatron-core
checkpoints: kinds ``qwen3-moe-dense``, ``qwen2-moe-dense``, ``glm4-moe-dense`` are test_moe_families.py's
Qwen3-MoE / Qwen2-MoE / GLM-4-MoE with ``moe_layer_freq`` [0, 1]: layer 0 a dense SwiGLU MLP of
``ffn_hidden_size`` 128, layer 1 the MoE (experts of 64). The hf output writes the dense layer as the class's
own MLP of ``intermediate_size`` (Qwen2/3-MoE: ``mlp_only_layers``; Glm4Moe: ``first_k_dense_replace``) and
transformers' class reproduces megatron-core's logits within 1e-4 in fp32, as does the onnx output through
onnxruntime (prefill and KV-cache decode steps). TensorRT-LLM 1.2's QWenDecoderLayer builds an MOE on every layer
once ``moe.num_experts`` is set (tensorrt_llm/models/qwen/model.py: no ``mlp_only_layers``): refused."""

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
from mexc.tools.cli import main

TOL = 1e-4
# kind -> (HF class, the dense layers' config field and value, the dense MLP's module class)
CLASSES = {"qwen3-moe-dense": ("Qwen3MoeForCausalLM", "mlp_only_layers", [0], "Qwen3MoeMLP"),
           "qwen2-moe-dense": ("Qwen2MoeForCausalLM", "mlp_only_layers", [0], "Qwen2MoeMLP"),
           "glm4-moe-dense": ("Glm4MoeForCausalLM", "first_k_dense_replace", 1, "Glm4MoeMLP")}


@pytest.mark.parametrize("kind,tp,fmt", [("qwen3-moe-dense", 1, "torch"), ("qwen2-moe-dense", 1, "torch"),
                                         ("glm4-moe-dense", 1, "torch"), ("qwen3-moe-dense", 2, "torch_dist")])
def test_dense_layer_lifted_and_interpreted(kind, tp, fmt):
    d = megatron_checkpoint(kind, tp=tp, fmt=fmt)
    ref = load_reference(d)
    m = lift(d / "ckpt")
    assert [n.layer for n in m.graph.find("mlp")] == [0] and [n.layer for n in m.graph.find("moe")] == [1]
    assert next(m.graph.find("mlp")).params["fc2"].type.shape == (64, 128)
    assert next(m.graph.find("moe")).params["fc2"].type.shape == (4, 64, 64)
    assert err(run(m, ref["tokens"]), ref["logits"]) < 1e-5


@pytest.mark.parametrize("kind,tp,fmt", [("qwen3-moe-dense", 1, "torch"), ("qwen2-moe-dense", 1, "torch"),
                                         ("glm4-moe-dense", 1, "torch"), ("qwen3-moe-dense", 2, "torch_dist")])
def test_hf_dense_layer_matches_megatron(tmp_path, kind, tp, fmt):
    cls, field, value, mlp = CLASSES[kind]
    d = megatron_checkpoint(kind, tp=tp, fmt=fmt)
    ref = load_reference(d)
    out = tmp_path / "hf"
    compile_checkpoint(d / "ckpt", out, CompileOptions(target="hf"))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == [cls] and cfg[field] == value
    assert (cfg["intermediate_size"], cfg["moe_intermediate_size"]) == (128, 64)
    model = hf_model(out)
    assert type(model.model.layers[0].mlp).__name__ == mlp and type(model.model.layers[1].mlp).__name__ != mlp
    with torch.no_grad():
        assert err(model(ref["tokens"]).logits, ref["logits"]) < TOL


@pytest.mark.parametrize("kind,profile", [("qwen3-moe-dense", "ort"), ("qwen2-moe-dense", "tensorrt"),
                                          ("glm4-moe-dense", "ort")])
def test_onnx_dense_layer_prefill_and_decode_match_megatron(tmp_path, kind, profile):
    ref = load_reference(megatron_checkpoint(kind))
    out = tmp_path / "onnx"
    compile_checkpoint(megatron_checkpoint(kind) / "ckpt", out, CompileOptions(target="onnx", profile=profile,
                                                                              build="never"))
    assert onnx_errors(out / "model.onnx", ref, prefix=5).worst < TOL


def test_trtllm_refuses_dense_layers_in_one_line(tmp_path, capsys):
    assert main(["compile", str(megatron_checkpoint("qwen3-moe-dense") / "ckpt"), "--target", "trtllm",
                 "--build", "never", "-o", str(tmp_path / "trt")]) != 0
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "dense (non-MoE) layers" in lines[0] and "QWenForCausalLM" in lines[0], lines
    assert not (tmp_path / "trt").exists()


def test_hf_refuses_what_the_dense_layers_cannot_be():
    from mexc.backends.hf import families

    m = lift(megatron_checkpoint("glm4-moe-dense") / "ckpt")
    mlp, moe = next(m.graph.find("mlp")), next(m.graph.find("moe"))
    mlp.layer, moe.layer = 1, 0                        # MoE first, dense after: no first_k_dense_replace says so
    family, problems = families.classify(m)
    assert family == "glm4_moe" and any("not all before the MoE layers" in p and "Glm4MoeForCausalLM" in p
                                        for p in problems), problems
    m = lift(megatron_checkpoint("qwen3-moe-dense") / "ckpt")
    mlp, moe = next(m.graph.find("mlp")), next(m.graph.find("moe"))
    mlp.layer, moe.layer = 1, 0                        # mlp_only_layers takes any layer
    family, problems = families.classify(m)
    assert family == "qwen3_moe" and not any("dense" in p for p in problems), problems
    mlp.attrs["activation"] = "gelu"                   # one hidden_act for the dense MLP and the experts
    family, problems = families.classify(m)
    assert any("experts' activation 'silu'" in p and "Qwen3MoeForCausalLM" in p for p in problems), problems
