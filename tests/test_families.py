"""Model families Megatron-Core's exporter lists (issue 10), each from a real megatron-core checkpoint
(tests/fixture_makers/megatron_core.py kinds starcoder, nemotron, gemma, gptnext, llama3, falcon, falcon2):
the reference executor, the hf output (through transformers' own class for the family), the onnx output (both
profiles) and the trtllm output (through tests/trtllm_reader.py, including TensorRT-LLM's GemmaForCausalLM and
FalconForCausalLM classes) reproduce megatron-core's logits; unsupported family x target pairs are one clear error
and write nothing."""

from __future__ import annotations

import json
import math

import pytest
import torch

import trtllm_reader
from megatron_fixtures import have_megatron_core, load_reference, megatron_checkpoint

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not have_megatron_core(), reason="megatron-core not installed")

from mexc.backends.base import CompileOptions  # noqa: E402
from mexc.backends.reference.executor import rope_tables, run  # noqa: E402
from mexc.driver import compile_checkpoint, lift  # noqa: E402
from mexc.errors import BackendError  # noqa: E402

TOL = 1e-4           # fp32, every target
GELU_TANH_TOL = 1e-3  # TensorRT-LLM's "gelu" is the tanh approximation, Megatron's GPT/StarCoder/Falcon use erf

HF_CLASS = {"starcoder": "GPTBigCodeForCausalLM", "nemotron": "NemotronForCausalLM", "gemma": "GemmaForCausalLM",
            "gptnext": "StableLmForCausalLM", "llama3": "LlamaForCausalLM", "falcon": "FalconForCausalLM",
            "falcon2": "FalconForCausalLM"}
SOURCES = [(k, 1) for k in HF_CLASS] + [("starcoder", 2), ("gemma", 2)]
IDS = [f"{k}-tp{tp}" for k, tp in SOURCES]

_lifted: dict = {}


def lifted(kind, tp=1):
    if (kind, tp) not in _lifted:
        _lifted[(kind, tp)] = lift(megatron_checkpoint(kind, tp=tp) / "ckpt")
    return _lifted[(kind, tp)]


def err(a, b) -> float:
    a, b = torch.as_tensor(a).float(), torch.as_tensor(b).float()
    V = min(a.shape[-1], b.shape[-1])
    return (a[..., :V] - b[..., :V]).abs().max().item()


# ------------------------------------------------------------------------------------------- frontend + IR


@pytest.mark.parametrize("kind,tp", SOURCES, ids=IDS)
def test_reference_executor_matches_megatron(kind, tp):
    d = megatron_checkpoint(kind, tp=tp)
    ref = load_reference(d)
    assert err(run(lifted(kind, tp), ref["tokens"]), ref["logits"]) < TOL


def test_ir_expresses_each_family():
    g = lifted("gemma").graph
    assert next(g.find("embedding")).attrs["scale"] == math.sqrt(64)
    assert all(n.attrs["zero_centered"] and n.attrs["kind"] == "rmsnorm" for n in g.find("norm"))
    assert {(m.attrs["activation"], m.attrs["gated"]) for m in g.find("mlp")} == {("gelu-tanh", True)}
    a = next(g.find("attention")).attrs
    assert (a["num_heads"], a["num_kv_heads"], a["head_dim"]) == (4, 1, 32)          # head_dim != 64 / 4
    assert next(g.find("lm_head")).attrs["tied"]

    g = lifted("nemotron").graph
    assert all(n.attrs["zero_centered"] and n.attrs["kind"] == "layernorm" for n in g.find("norm"))
    assert {(m.attrs["activation"], m.attrs["gated"]) for m in g.find("mlp")} == {("squared-relu", False)}
    assert next(g.find("attention")).attrs["rope"].percent == 0.5
    assert not next(g.find("lm_head")).attrs["tied"]

    g = lifted("starcoder").graph
    assert "position" in next(g.find("embedding")).params and next(g.find("attention")).attrs["num_kv_heads"] == 1
    assert {"qkv_bias", "proj_bias"} <= set(next(g.find("attention")).params)

    g = lifted("llama3").graph
    rope = next(g.find("attention")).attrs["rope"]
    assert (rope.scaling, rope.factor, rope.base) == ("llama3", 8.0, 500000.0)

    # Falcon: the parallel block is wiring -- one add of three inputs per layer, not a special op
    for kind, norms_per_layer in (("falcon", 1), ("falcon2", 2)):
        m = lifted(kind)
        adds = [n for n in m.graph.find("add")]
        assert len(adds) == 2 and all(len(n.inputs) == 3 for n in adds)
        assert sum(1 for n in m.graph.find("norm") if n.layer == 0) == norms_per_layer
        attn = next(n for n in m.graph.nodes if n.op == "attention" and n.layer == 0)
        mlp = next(n for n in m.graph.nodes if n.op == "mlp" and n.layer == 0)
        assert (attn.inputs[0] is mlp.inputs[0]) == (norms_per_layer == 1)


def test_llama3_inv_freq_equals_megatron_and_transformers():
    """mexc's llama3 inv_freq scaling == megatron-core's RotaryEmbedding._apply_scaling == transformers' llama3."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from mexc.backends.reference.executor import _llama3_inv_freq
    from mexc.ir import Rope

    for d, base, factor in ((16, 500000.0, 8.0), (128, 500000.0, 8.0), (64, 10000.0, 32.0)):
        rope = Rope(base=base, scaling="llama3", factor=factor)
        inv = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
        ours = _llama3_inv_freq(inv, rope)
        mc = RotaryEmbedding(kv_channels=d, rotary_percent=1.0, rotary_base=base, rope_scaling=True,
                             rope_scaling_factor=factor, use_cpu_initialization=True).inv_freq
        assert torch.allclose(ours.float(), mc, rtol=1e-6, atol=0), (d, base, factor)
        cfg = LlamaConfig(hidden_size=d * 4, num_attention_heads=4, head_dim=d, max_position_embeddings=16384,
                          rope_parameters={"rope_type": "llama3", "rope_theta": base, "factor": factor,
                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                           "original_max_position_embeddings": 8192})
        hf, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
        assert torch.allclose(ours.float(), hf.float(), rtol=1e-6, atol=0), (d, base, factor)
        assert not torch.allclose(ours, inv)        # the scaling really changes some frequencies
    # and the tables the executor builds from it at long positions
    cos, _ = rope_tables(Rope(base=500000.0, scaling="llama3", factor=8.0), 16, torch.arange(4096)[None])
    assert cos.shape == (1, 4096, 16)


# ------------------------------------------------------------------------------------------- hf


def _hf(tmp_path, kind, tp=1):
    d = megatron_checkpoint(kind, tp=tp)
    out = tmp_path / f"hf-{kind}-{tp}"
    compile_checkpoint(d / "ckpt", out, CompileOptions(target="hf"))
    transformers.logging.set_verbosity_error()
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                                   output_loading_info=True)
    assert not {k: v for k, v in info.items() if v}, info
    return d, out, model.eval(), json.loads((out / "config.json").read_text())


@pytest.mark.parametrize("kind,tp", SOURCES, ids=IDS)
def test_hf_family_class_matches_megatron(tmp_path, kind, tp):
    d, out, model, cfg = _hf(tmp_path, kind, tp)
    ref = load_reference(d)
    assert cfg["architectures"] == [HF_CLASS[kind]] and type(model).__name__ == HF_CLASS[kind]
    with torch.no_grad():
        logits = model(ref["tokens"]).logits
    assert err(logits, ref["logits"]) < TOL


def test_hf_family_configs(tmp_path):
    from safetensors import safe_open

    # Gemma: the stored norm weight stays zero-centered (GemmaRMSNorm computes 1 + w), normalizer sqrt(hidden)
    d, out, model, cfg = _hf(tmp_path, "gemma")
    assert cfg["hidden_act"] == "gelu_pytorch_tanh" and cfg["head_dim"] == 32 and cfg["num_key_value_heads"] == 1
    assert cfg["tie_word_embeddings"] is True and cfg["rms_norm_eps"] == 1e-6
    src = _src_state(d)
    with safe_open(out / "model.safetensors", "pt") as f:
        assert torch.equal(f.get_tensor("model.layers.0.input_layernorm.weight"),
                           src["decoder.layers.0.input_layernorm.weight"])
        assert torch.equal(f.get_tensor("model.norm.weight"), src["decoder.final_layernorm.weight"])
    assert float(model.model.embed_tokens.embed_scale) == 8.0
    # Nemotron: LayerNorm1P weight stays zero-centered too; partial rotary explicit
    d, out, _, cfg = _hf(tmp_path, "nemotron")
    assert cfg["hidden_act"] == "relu2" and cfg["rope_parameters"]["partial_rotary_factor"] == 0.5
    assert cfg["attention_bias"] is False and cfg["mlp_bias"] is False and cfg["tie_word_embeddings"] is False
    src = _src_state(d)
    with safe_open(out / "model.safetensors", "pt") as f:
        assert torch.equal(f.get_tensor("model.layers.1.post_attention_layernorm.weight"),
                           src["decoder.layers.1.pre_mlp_layernorm.weight"])
    # StarCoder: multi-query GPTBigCode with biases
    _, _, _, cfg = _hf(tmp_path, "starcoder")
    assert cfg["multi_query"] is True and cfg["activation_function"] == "gelu"
    # GPT-Next -> StableLM with explicit full rotary (StableLM's default is 0.25)
    _, _, _, cfg = _hf(tmp_path, "gptnext")
    assert cfg["rope_parameters"]["partial_rotary_factor"] == 1.0 and cfg["use_qkv_bias"] is False
    # Llama 3 rope scaling
    _, _, _, cfg = _hf(tmp_path, "llama3")
    assert cfg["rope_parameters"] == {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 8192}
    # Falcon: falcon-7b style (one norm, multi-query) and the new decoder architecture (ln_attn/ln_mlp, GQA)
    _, out, _, cfg = _hf(tmp_path, "falcon")
    assert (cfg["parallel_attn"], cfg["multi_query"], cfg["new_decoder_architecture"], cfg["bias"]) == \
        (True, True, False, False)
    _, out, _, cfg = _hf(tmp_path, "falcon2")
    assert (cfg["new_decoder_architecture"], cfg["num_kv_heads"], cfg["num_ln_in_parallel_attn"], cfg["bias"]) == \
        (True, 2, 2, True)
    with safe_open(out / "model.safetensors", "pt") as f:
        assert {"transformer.h.0.ln_attn.weight", "transformer.h.0.ln_mlp.bias"} <= set(f.keys())


def _exact_gelu(m):
    for n in m.graph.find("mlp"):
        n.attrs["activation"] = "gelu"


def _partial_rotary(m):
    for n in m.graph.find("attention"):
        n.attrs["rope"] = type(n.attrs["rope"])(percent=0.5)


def _untie(m):
    next(m.graph.find("lm_head")).attrs["tied"] = False


def _check(target, kind, mutate=None, **kw) -> str:
    """What ``target``'s check says of fixture ``kind`` after ``mutate`` and the target's legalization."""
    from mexc.driver import get_backend
    from mexc.passes import PassManager

    model = lift(megatron_checkpoint(kind) / "ckpt")
    if mutate:
        mutate(model)
    backend, opts = get_backend(target), CompileOptions(target=target, build="never", **kw)
    PassManager(backend.legalize(opts, model))(model)
    return " ".join(backend.check(model, opts))


def _tanh_gelu_only(got, d, ref):
    """TRT-LLM's "gelu" is the tanh approximation, the fixtures' MLPs use exact erf GELU: close to megatron,
    and equal to the reference executor run with tanh GELU (the difference is only the approximation)."""
    assert err(got, ref["logits"]) < GELU_TANH_TOL
    model = lift(d / "ckpt")
    for n in model.graph.find("mlp"):
        n.attrs["activation"] = "gelu-tanh"
    assert err(got, run(model, ref["tokens"])) < 1e-5


def test_hf_refusals_name_family_and_reason():
    msg = _check("hf", "gemma", lambda m: setattr(next(m.graph.find("mlp")), "attrs",
                                                  {**next(m.graph.find("mlp")).attrs, "activation": "gelu"}))
    assert "GemmaForCausalLM" in msg and "tanh and erf GELU" in msg   # exact GeGLU alone: test_attention_settings
    msg = _check("hf", "falcon", _partial_rotary)
    assert "partial rotary" in msg and "FalconForCausalLM" in msg

    def squared(m):
        for n in m.graph.find("mlp"):
            n.attrs["activation"] = "squared-relu"

    msg = _check("hf", "gptnext", squared)
    assert "StableLmForCausalLM" in msg and "squared-relu" in msg


# ------------------------------------------------------------------------------------------- onnx


@pytest.mark.parametrize("profile", ["ort", "tensorrt"])
@pytest.mark.parametrize("kind", list(HF_CLASS))
def test_onnx_matches_megatron(tmp_path, kind, profile):
    from test_onnx_backend import Decoder

    d = megatron_checkpoint(kind)
    ref = load_reference(d)
    out = tmp_path / "onnx"
    compile_checkpoint(d / "ckpt", out, CompileOptions(target="onnx", profile=profile, build="never"))
    logits, _ = Decoder(out / "model.onnx").step(ref["tokens"].numpy(), None, 0)
    assert logits.shape[-1] == 100
    assert err(logits, ref["logits"]) < TOL


# ------------------------------------------------------------------------------------------- trtllm


def _trtllm(tmp_path, kind, tp):
    d = megatron_checkpoint(kind)
    out = tmp_path / f"trt-{kind}-{tp}"
    compile_checkpoint(d / "ckpt", out, CompileOptions(target="trtllm", tp=tp, build="never"))
    cfg, tensors = trtllm_reader.read_checkpoint(str(out))   # layout, shapes, TP merge, config checks
    return d, out, cfg, tensors


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("kind", ["nemotron", "llama3"])
def test_trtllm_reader_logits(tmp_path, kind, tp):
    """GPT class (Nemotron: squared-relu, rotary_pct 0.5, LayerNorm1p folded) and Llama class (llama3 scaling):
    the reader turns them into transformers models itself."""
    d, out, cfg, _ = _trtllm(tmp_path, kind, tp)
    ref = load_reference(d)
    if kind == "nemotron":
        assert (cfg["architecture"], cfg["hidden_act"], cfg["rotary_pct"]) == ("GPTForCausalLM", "squared-relu", 0.5)
        assert cfg["bias"] is False
    else:
        assert cfg["rotary_scaling"]["type"] == "llama3" and cfg["rotary_base"] == 500000.0
    assert err(trtllm_reader.logits(str(out), ref["tokens"]), ref["logits"]) < TOL


def _bigcode_from_trtllm(cfg, t):
    """The reader's tensors (GPT class, MQA) as GPTBigCodeForCausalLM: TRT-LLM 'gelu' = tanh approximation."""
    H, L, V = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    hf = transformers.GPTBigCodeConfig(vocab_size=V, n_positions=cfg["max_position_embeddings"], n_embd=H, n_layer=L,
                                       n_head=cfg["num_attention_heads"], n_inner=cfg["intermediate_size"],
                                       activation_function="gelu_pytorch_tanh", multi_query=True,
                                       layer_norm_epsilon=cfg["norm_epsilon"], resid_pdrop=0.0, embd_pdrop=0.0,
                                       attn_pdrop=0.0, tie_word_embeddings=cfg["tie_word_embeddings"])
    sd = {"transformer.wte.weight": t["transformer.vocab_embedding.weight"],
          "transformer.wpe.weight": t["transformer.position_embedding.weight"],
          "transformer.ln_f.weight": t["transformer.ln_f.weight"], "transformer.ln_f.bias": t["transformer.ln_f.bias"],
          "lm_head.weight": t.get("lm_head.weight", t["transformer.vocab_embedding.weight"])}
    m = {"input_layernorm": "ln_1", "post_layernorm": "ln_2", "attention.qkv": "attn.c_attn",
         "attention.dense": "attn.c_proj", "mlp.fc": "mlp.c_fc", "mlp.proj": "mlp.c_proj"}
    for i in range(L):
        for a, b in m.items():
            for w in ("weight", "bias"):
                sd[f"transformer.h.{i}.{b}.{w}"] = t[f"transformer.layers.{i}.{a}.{w}"]
    return hf, sd


def _stablelm_from_trtllm(cfg, t):
    """The reader's tensors (GPT class, swiglu, rope_gpt_neox, LayerNorm) as StableLmForCausalLM."""
    H, L, V, nh = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"], cfg["num_attention_heads"]
    nkv, d = cfg["num_key_value_heads"], cfg["head_size"]
    hf = transformers.StableLmConfig(vocab_size=V, hidden_size=H, intermediate_size=cfg["intermediate_size"],
                                     num_hidden_layers=L, num_attention_heads=nh, num_key_value_heads=nkv,
                                     hidden_act="silu", layer_norm_eps=cfg["norm_epsilon"],
                                     max_position_embeddings=cfg["max_position_embeddings"],
                                     tie_word_embeddings=cfg["tie_word_embeddings"],
                                     rope_parameters={"rope_type": "default", "rope_theta": cfg["rotary_base"],
                                                      "partial_rotary_factor": cfg["rotary_pct"]})
    sd = {"model.embed_tokens.weight": t["transformer.vocab_embedding.weight"],
          "model.norm.weight": t["transformer.ln_f.weight"], "model.norm.bias": t["transformer.ln_f.bias"],
          "lm_head.weight": t.get("lm_head.weight", t["transformer.vocab_embedding.weight"])}
    for i in range(L):
        s, o = f"transformer.layers.{i}.", f"model.layers.{i}."
        for a, b in (("input_layernorm", "input_layernorm"), ("post_layernorm", "post_attention_layernorm")):
            sd[o + b + ".weight"], sd[o + b + ".bias"] = t[s + a + ".weight"], t[s + a + ".bias"]
        q, k, v = torch.split(t[s + "attention.qkv.weight"], [nh * d, nkv * d, nkv * d], 0)
        sd[o + "self_attn.q_proj.weight"], sd[o + "self_attn.k_proj.weight"], sd[o + "self_attn.v_proj.weight"] = q, k, v
        sd[o + "self_attn.o_proj.weight"] = t[s + "attention.dense.weight"]
        sd[o + "mlp.gate_proj.weight"] = t[s + "mlp.fc.weight"]      # TRT-LLM mlp.fc = the activated branch
        sd[o + "mlp.up_proj.weight"] = t[s + "mlp.gate.weight"]
        sd[o + "mlp.down_proj.weight"] = t[s + "mlp.proj.weight"]
    return hf, sd


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("kind", ["starcoder", "gptnext"])
def test_trtllm_gpt_class_mqa_and_swiglu(tmp_path, kind, tp):
    """StarCoder (GPT class, num_key_value_heads=1) and GPT-Next (GPT class, swiglu): the reader checks and merges
    the checkpoint; its transformers conversion covers neither, so the test maps the read tensors itself."""
    d, out, cfg, t = _trtllm(tmp_path, kind, tp)
    ref = load_reference(d)
    assert cfg["architecture"] == "GPTForCausalLM"
    if kind == "starcoder":
        assert cfg["num_key_value_heads"] == 1 and cfg["position_embedding_type"] == "learned_absolute"
        assert cfg["bias"] is True and cfg["hidden_act"] == "gelu"
        hf, sd = _bigcode_from_trtllm(cfg, t)
    else:
        assert cfg["hidden_act"] == "swiglu" and cfg["position_embedding_type"] == "rope_gpt_neox"
        hf, sd = _stablelm_from_trtllm(cfg, t)
    with torch.no_grad():
        got = trtllm_reader.build_hf_model(hf, sd)(input_ids=ref["tokens"], use_cache=False).logits
    if kind == "starcoder":
        _tanh_gelu_only(got, d, ref)
    else:
        assert err(got, ref["logits"]) < TOL


def _src_state(d):
    return torch.load(d / "ckpt/iter_0000010/mp_rank_00/model_optim_rng.pt", weights_only=False)["model"]


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("kind", ["gemma", "falcon", "falcon2"])
def test_trtllm_gemma_and_falcon_classes(tmp_path, kind, tp):
    """Gemma -> TensorRT-LLM's GemmaForCausalLM, Falcon (one norm, MQA) and the new decoder architecture (two
    norms, GQA, biases) -> FalconForCausalLM; the reader builds transformers' Gemma / Falcon from the checkpoint
    with TensorRT-LLM's semantics (its own, not mexc's). Falcon2 at tp 2 is refused: TensorRT-LLM adds a parallel
    block's row-parallel biases on every rank before one all-reduce."""
    if (kind, tp) == ("falcon2", 2):
        d = megatron_checkpoint(kind)
        with pytest.raises(BackendError) as e:
            compile_checkpoint(d / "ckpt", tmp_path / "out", CompileOptions(target="trtllm", tp=2, build="never"))
        msg = str(e.value)
        assert "FalconForCausalLM" in msg and "biases with tp > 1" in msg and "--target hf" in msg
        assert not (tmp_path / "out").exists()
        return
    d, out, cfg, t = _trtllm(tmp_path, kind, tp)
    ref = load_reference(d)
    src = _src_state(d)
    got = trtllm_reader.logits(str(out), ref["tokens"])
    if kind == "gemma":
        assert (cfg["architecture"], cfg["hidden_act"], cfg["head_size"], cfg["num_key_value_heads"]) == \
            ("GemmaForCausalLM", "gelu", 32, 1)
        assert cfg["share_embedding_table"] is True and cfg["use_parallel_embedding"] == (tp > 1)
        assert cfg["position_embedding_type"] == "rope_gpt_neox" and cfg["norm_epsilon"] == 1e-6
        # TRT-LLM's converter stores 1 + w (its RmsNorm multiplies by the weight) and the raw embedding (its
        # GemmaModel multiplies by sqrt(hidden_size))
        assert torch.equal(t["transformer.layers.0.input_layernorm.weight"],
                           src["decoder.layers.0.input_layernorm.weight"] + 1)
        assert torch.equal(t["transformer.ln_f.weight"], src["decoder.final_layernorm.weight"] + 1)
        emb = t["transformer.vocab_embedding.weight"]   # Megatron's padding rows trimmed
        assert torch.equal(emb, src["embedding.word_embeddings.weight"][:emb.shape[0]])
        assert err(got, ref["logits"]) < TOL         # GeGLU with tanh GELU on both sides: no approximation
        return
    assert cfg["architecture"] == "FalconForCausalLM" and cfg["hidden_act"] == "gelu"
    assert cfg["parallel_attention"] is True and cfg["head_size"] * cfg["num_attention_heads"] == cfg["hidden_size"]
    layer0 = {k.split(".", 3)[3] for k in t if k.startswith("transformer.layers.0.")}
    assert not any(k.startswith("post_layernorm") for k in layer0)
    if kind == "falcon":
        assert (cfg["new_decoder_architecture"], cfg["bias"], cfg["num_key_value_heads"]) == (False, False, 1)
        assert not any(k.startswith("mlp_layernorm") for k in layer0)
    else:
        assert (cfg["new_decoder_architecture"], cfg["num_ln_in_parallel_attn"], cfg["bias"],
                cfg["num_key_value_heads"]) == (True, 2, True, 2)
        assert {"mlp_layernorm.weight", "mlp_layernorm.bias", "attention.dense.bias", "mlp.proj.bias"} <= layer0
    _tanh_gelu_only(got, d, ref)


def test_trtllm_gemma_and_falcon_refusals():
    """What the two classes cannot express is one clear error naming the class, before any file is written."""
    def check(kind, mutate=None, **kw):
        return _check("trtllm", kind, mutate, **kw)

    assert check("gemma") == "" and check("falcon") == "" and check("falcon2") == ""
    msg = check("gemma", _exact_gelu)
    assert "GemmaForCausalLM" in msg and "tanh" in msg
    assert "share_embedding_table" in check("gemma", _untie)
    assert "pipeline" in check("gemma", pp=2)
    msg = check("falcon", _partial_rotary)
    assert "partial rotary" in msg and "FalconForCausalLM" in msg
    assert "biases with tp > 1" in check("falcon2", tp=2)
    assert check("falcon", tp=2) == "" and check("falcon", pp=2) == ""
