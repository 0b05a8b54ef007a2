"""Self-check of tests/trtllm_reader.py.

Tiny random transformers models are converted to TensorRT-LLM checkpoints by a small
writer that lives in this file (it follows TensorRT-LLM's own HF converters:
tensorrt_llm/models/{llama,gpt}/convert.py semantics), read back through the reader,
and their logits compared with the original HF model.
"""
import json
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import trtllm_reader as R  # noqa: E402

transformers = pytest.importorskip("transformers")
from safetensors.torch import save_file  # noqa: E402

V = 101  # not a multiple of tp: exercises lm_head padding
TOK = torch.tensor([[3, 17, 42, 99, 0, 5, 77, 100, 12, 64], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])


# ----------------------------------------------------------------------------
# A tiny independent TRT-LLM checkpoint writer (HF -> TRT-LLM), test-only
# ----------------------------------------------------------------------------

def _split(t, tp, r, dim):
    assert t.shape[dim] % tp == 0
    return torch.chunk(t, tp, dim=dim)[r].clone()


def _pad_rows(t, rows):
    if t.shape[0] == rows:
        return t
    return torch.cat([t, torch.zeros(rows - t.shape[0], *t.shape[1:], dtype=t.dtype)], 0)


def _qkv_rank(q, k, v, nkv, tp, r):
    """TRT-LLM per-rank [Q_r; K_r; V_r] with KV heads duplicated when tp > nkv."""
    if tp > nkv:
        reps = tp // nkv
        d = k.shape[0] // nkv
        k = k.reshape(nkv, 1, d, *k.shape[1:]).expand(nkv, reps, d, *k.shape[1:]).reshape(nkv * reps * d, *k.shape[1:])
        v = v.reshape(nkv, 1, d, *v.shape[1:]).expand(nkv, reps, d, *v.shape[1:]).reshape(nkv * reps * d, *v.shape[1:])
    return torch.cat([_split(q, tp, r, 0), _split(k, tp, r, 0), _split(v, tp, r, 0)], 0)


def _save(out, cfg, ranks):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    for rank, t in ranks.items():
        save_file({k: v.contiguous() for k, v in t.items()}, os.path.join(out, f"rank{rank}.safetensors"))


def write_llama(model, out, tp=1, pp=1, moe_ep=1, parallel_embedding=False, write_lm_head=True,
                quant=None):
    """quant: None | 'W8A16' | 'W4A16' | 'FP8' (weights quantized by this writer)."""
    hc = model.config
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    H, L, nh, nkv = hc.hidden_size, hc.num_hidden_layers, hc.num_attention_heads, hc.num_key_value_heads
    d = getattr(hc, "head_dim", None) or H // nh
    I = hc.intermediate_size
    is_moe = hasattr(hc, "num_local_experts")
    attn_bias = "model.layers.0.self_attn.q_proj.bias" in sd
    moe_tp = tp // moe_ep
    cfg = dict(architecture="MixtralForCausalLM" if is_moe else "LlamaForCausalLM", dtype="float32",
               logits_dtype="float32", vocab_size=hc.vocab_size, hidden_size=H, num_hidden_layers=L,
               num_attention_heads=nh, num_key_value_heads=nkv, head_size=d, intermediate_size=I,
               hidden_act="swiglu" if is_moe else "silu", norm_epsilon=hc.rms_norm_eps,
               position_embedding_type="rope_gpt_neox",
               max_position_embeddings=hc.max_position_embeddings,
               rotary_base=hc.rope_parameters["rope_theta"], attn_bias=attn_bias,
               use_parallel_embedding=parallel_embedding, embedding_sharding_dim=0,
               mapping=dict(world_size=tp * pp, tp_size=tp, pp_size=pp, moe_tp_size=moe_tp,
                            moe_ep_size=moe_ep),
               quantization=dict(quant_algo=quant))
    if is_moe:
        cfg["moe"] = dict(num_experts=hc.num_local_experts, top_k=hc.num_experts_per_tok,
                          normalization_mode=1)
    Vp = math.ceil(hc.vocab_size / tp) * tp

    def lin(name, w, res):
        if quant in ("W8A16", "W4A16"):
            bits = 8 if quant == "W8A16" else 4
            v = w.t().contiguous()  # [in, out]
            scale = v.abs().amax(0) / (1 << (bits - 1))
            qv = torch.clamp(torch.round(v / scale), -(1 << (bits - 1)), (1 << (bits - 1)) - 1).to(torch.int8)
            if bits == 4:  # two int4 per byte along out, element 2j in the low nibble
                lo, hi = qv[:, 0::2].to(torch.int16) & 0xF, qv[:, 1::2].to(torch.int16) & 0xF
                b = lo | (hi << 4)
                qv = torch.where(b > 127, b - 256, b).to(torch.int8)
            res[name + ".weight"] = qv
            res[name + ".per_channel_scale"] = scale
        elif quant == "FP8":
            s = (w.abs().max() / 448.0).reshape(1)
            res[name + ".weight"] = (w / s).to(torch.float8_e4m3fn)
            res[name + ".weights_scaling_factor"] = s
            res[name + ".activation_scaling_factor"] = torch.ones(1)
        else:
            res[name + ".weight"] = w

    ranks = {}
    for p in range(pp):
        layers = torch.tensor_split(torch.arange(L), pp)[p].tolist()
        for r in range(tp):
            res = {}
            if p == 0:
                emb = sd["model.embed_tokens.weight"]
                res["transformer.vocab_embedding.weight"] = (
                    _split(_pad_rows(emb, Vp), tp, r, 0) if parallel_embedding else emb)
            for li, gl in enumerate(layers):
                s, o = f"model.layers.{gl}.", f"transformer.layers.{li}."
                res[o + "input_layernorm.weight"] = sd[s + "input_layernorm.weight"]
                res[o + "post_layernorm.weight"] = sd[s + "post_attention_layernorm.weight"]
                lin(o + "attention.qkv", _qkv_rank(sd[s + "self_attn.q_proj.weight"], sd[s + "self_attn.k_proj.weight"],
                                                   sd[s + "self_attn.v_proj.weight"], nkv, tp, r), res)
                if attn_bias:
                    res[o + "attention.qkv.bias"] = _qkv_rank(sd[s + "self_attn.q_proj.bias"],
                                                              sd[s + "self_attn.k_proj.bias"],
                                                              sd[s + "self_attn.v_proj.bias"], nkv, tp, r)
                    res[o + "attention.dense.bias"] = torch.zeros(H)
                lin(o + "attention.dense", _split(sd[s + "self_attn.o_proj.weight"], tp, r, 1), res)
                if is_moe:
                    E = hc.num_local_experts
                    ep_r, tp_r = r % moe_ep, r // moe_ep
                    experts = slice(ep_r * E // moe_ep, (ep_r + 1) * E // moe_ep)
                    gu = sd[s + "mlp.experts.gate_up_proj"][experts]  # [E_l, 2I, H] = [w1; w3]
                    w1, w3 = gu[:, :I], gu[:, I:]
                    res[o + "mlp.router.weight"] = sd[s + "mlp.gate.weight"].float()
                    res[o + "mlp.fc.weight"] = torch.cat([_split(w3, moe_tp, tp_r, 1), _split(w1, moe_tp, tp_r, 1)], 1)
                    res[o + "mlp.proj.weight"] = _split(sd[s + "mlp.experts.down_proj"][experts], moe_tp, tp_r, 2)
                else:
                    lin(o + "mlp.fc", _split(sd[s + "mlp.gate_proj.weight"], tp, r, 0), res)
                    lin(o + "mlp.gate", _split(sd[s + "mlp.up_proj.weight"], tp, r, 0), res)
                    lin(o + "mlp.proj", _split(sd[s + "mlp.down_proj.weight"], tp, r, 1), res)
            if p == pp - 1:
                res["transformer.ln_f.weight"] = sd["model.norm.weight"]
                if write_lm_head:
                    res["lm_head.weight"] = _split(_pad_rows(sd["lm_head.weight"], Vp), tp, r, 0)
            ranks[p * tp + r] = res
    _save(out, cfg, ranks)
    return cfg


def write_gpt2(model, out, tp=1, pp=1, write_lm_head=True):
    hc = model.config
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    H, L, nh, I = hc.n_embd, hc.n_layer, hc.n_head, hc.n_inner or 4 * hc.n_embd
    cfg = dict(architecture="GPTForCausalLM", dtype="float32", vocab_size=hc.vocab_size, hidden_size=H,
               num_hidden_layers=L, num_attention_heads=nh, intermediate_size=I, hidden_act="gelu",
               norm_epsilon=hc.layer_norm_epsilon, position_embedding_type="learned_absolute",
               max_position_embeddings=hc.n_positions, bias=True,
               mapping=dict(world_size=tp * pp, tp_size=tp, pp_size=pp))
    Vp = math.ceil(hc.vocab_size / tp) * tp

    def qkv_split(w):  # MHA shortcut of the converters: [3, H, ...] split on dim 1
        return w.reshape(3, H, *w.shape[1:])

    ranks = {}
    for p in range(pp):
        layers = torch.tensor_split(torch.arange(L), pp)[p].tolist()
        for r in range(tp):
            res = {}
            if p == 0:
                res["transformer.vocab_embedding.weight"] = sd["transformer.wte.weight"]
                res["transformer.position_embedding.weight"] = sd["transformer.wpe.weight"]
            for li, gl in enumerate(layers):
                s, o = f"transformer.h.{gl}.", f"transformer.layers.{li}."
                for a, b in (("ln_1", "input_layernorm"), ("ln_2", "post_layernorm")):
                    res[o + b + ".weight"] = sd[s + a + ".weight"]
                    res[o + b + ".bias"] = sd[s + a + ".bias"]
                w = sd[s + "attn.c_attn.weight"].t()  # Conv1D [in, out] -> [out, in]
                res[o + "attention.qkv.weight"] = _split(qkv_split(w), tp, r, 1).reshape(-1, H)
                res[o + "attention.qkv.bias"] = _split(qkv_split(sd[s + "attn.c_attn.bias"]), tp, r, 1).reshape(-1)
                res[o + "attention.dense.weight"] = _split(sd[s + "attn.c_proj.weight"].t(), tp, r, 1)
                res[o + "attention.dense.bias"] = sd[s + "attn.c_proj.bias"]
                res[o + "mlp.fc.weight"] = _split(sd[s + "mlp.c_fc.weight"].t(), tp, r, 0)
                res[o + "mlp.fc.bias"] = _split(sd[s + "mlp.c_fc.bias"], tp, r, 0)
                res[o + "mlp.proj.weight"] = _split(sd[s + "mlp.c_proj.weight"].t(), tp, r, 1)
                res[o + "mlp.proj.bias"] = sd[s + "mlp.c_proj.bias"]
            if p == pp - 1:
                res["transformer.ln_f.weight"] = sd["transformer.ln_f.weight"]
                res["transformer.ln_f.bias"] = sd["transformer.ln_f.bias"]
                if write_lm_head:
                    res["lm_head.weight"] = _split(_pad_rows(sd["lm_head.weight"], Vp), tp, r, 0)
            ranks[p * tp + r] = res
    _save(out, cfg, ranks)
    return cfg


# ----------------------------------------------------------------------------
# Tiny models
# ----------------------------------------------------------------------------

def _init(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight") or ".ln_" in n and n.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))
    return model.eval()


def _llama(attn_bias=False):
    common = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                  rms_norm_eps=1e-5, tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    if attn_bias:
        cfg = transformers.Qwen2Config(use_sliding_window=False, **common)
    else:
        cfg = transformers.LlamaConfig(**common)
    return _init(transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager"), 1)


def _mixtral():
    cfg = transformers.MixtralConfig(vocab_size=V, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                     num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
                                     tie_word_embeddings=False, router_jitter_noise=0.0,
                                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    return _init(transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager"), 2)


def _gpt2():
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=32, n_embd=64, n_layer=3, n_head=4,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return _init(transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager"), 3)


@torch.no_grad()
def _ref(model):
    return model(input_ids=TOK, use_cache=False).logits[..., :V].float()


def _close(a, b, tol=1e-5):
    assert a.shape == b.shape, (a.shape, b.shape)
    err = (a - b).abs().max().item()
    assert err <= tol, f"max |diff| = {err}"


@pytest.fixture(scope="module")
def llama():
    return _llama()


@pytest.fixture(scope="module")
def llama_ref(llama):
    return _ref(llama)


@pytest.mark.parametrize("tp,pp,pe", [(1, 1, False), (2, 1, False), (1, 2, False), (4, 1, False),
                                      (2, 2, True)])
def test_llama_roundtrip(tmp_path, llama, llama_ref, tp, pp, pe):
    write_llama(llama, str(tmp_path), tp=tp, pp=pp, parallel_embedding=pe)
    _close(R.logits(str(tmp_path), TOK), llama_ref)


def test_llama_tied_no_lm_head(tmp_path):
    m = _llama()
    m.lm_head.weight = m.model.embed_tokens.weight  # tie
    write_llama(m, str(tmp_path), write_lm_head=False)
    cfg, t = R.read_checkpoint(str(tmp_path))
    hf_cfg, sd = R.to_hf(cfg, t)
    assert hf_cfg.tie_word_embeddings
    assert torch.equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"])
    _close(R.logits(str(tmp_path), TOK), _ref(m))


def test_qwen2_attn_bias_tp2(tmp_path):
    m = _llama(attn_bias=True)
    write_llama(m, str(tmp_path), tp=2)
    hf_cfg, _ = R.to_hf(*R.read_checkpoint(str(tmp_path)))
    assert type(hf_cfg).__name__ == "Qwen2Config"
    _close(R.logits(str(tmp_path), TOK), _ref(m))


@pytest.mark.parametrize("tp,pp,pe,lm", [(1, 1, False, False), (2, 1, False, True), (1, 2, False, True)])
def test_gpt2_roundtrip(tmp_path, tp, pp, pe, lm):
    m = _gpt2()
    write_gpt2(m, str(tmp_path), tp=tp, pp=pp, write_lm_head=lm)
    _close(R.logits(str(tmp_path), TOK), _ref(m))


@pytest.mark.parametrize("tp,pp,ep", [(1, 1, 1), (2, 1, 1), (2, 1, 2), (1, 2, 1)])
def test_mixtral_roundtrip(tmp_path, tp, pp, ep):
    m = _mixtral()
    write_llama(m, str(tmp_path), tp=tp, pp=pp, moe_ep=ep)
    cfg, t = R.read_checkpoint(str(tmp_path))
    assert t["transformer.layers.0.mlp.router.weight"].dtype == torch.float32
    assert tuple(t["transformer.layers.0.mlp.fc.weight"].shape) == (4, 64, 64)
    _close(R.logits(str(tmp_path), TOK), _ref(m))


# ----------------------------------------------------------------------------
# Quantized checkpoints: compare against the HF model carrying the same dequantized weights
# ----------------------------------------------------------------------------

def _dequant_model(model, fn):
    """Copy of `model` whose attention/MLP linear weights went through fn (per TP shard = 1 here)."""
    m = _llama()
    m.load_state_dict(model.state_dict())
    with torch.no_grad():
        for n, p in m.named_parameters():
            if any(k in n for k in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")):
                p.copy_(fn(p))
    return m


def _wo_fake(bits):
    def f(w):
        v = w.t()
        s = v.abs().amax(0) / (1 << (bits - 1))
        q = torch.clamp(torch.round(v / s), -(1 << (bits - 1)), (1 << (bits - 1)) - 1)
        return (q * s).t()
    return f


@pytest.mark.parametrize("algo,bits", [("W8A16", 8), ("W4A16", 4)])
def test_weight_only(tmp_path, llama, algo, bits):
    # q,k,v are quantized as one fused qkv matrix, whose per-output-column scales equal the
    # separate per-row scales, so per-matrix fake quantization of the HF weights is equivalent.
    write_llama(llama, str(tmp_path), quant=algo)
    cfg, t = R.read_checkpoint(str(tmp_path))
    _close(R.logits(str(tmp_path), TOK), _ref(_dequant_model(llama, _wo_fake(bits))), tol=1e-4)


def test_weight_only_float_weights_emulated(tmp_path, llama):
    # float weights + quant_algo W8A16: trtllm-build quantizes them itself; the reader emulates it
    write_llama(llama, str(tmp_path))
    with open(tmp_path / "config.json") as f:
        cfg = json.load(f)
    cfg["quantization"] = {"quant_algo": "W8A16"}
    with open(tmp_path / "config.json", "w") as f:
        json.dump(cfg, f)
    _close(R.logits(str(tmp_path), TOK), _ref(_dequant_model(llama, _wo_fake(8))), tol=1e-4)
    _close(R.logits(str(tmp_path), TOK, emulate_build_quant=False), _ref(llama))


def test_fp8(tmp_path, llama):
    write_llama(llama, str(tmp_path), quant="FP8")

    def f(w):
        s = w.abs().max() / 448.0
        return (w / s).to(torch.float8_e4m3fn).float() * s
    # qkv is one FP8 tensor with ONE scale; emulate that by quantizing the fused matrix
    m = _llama()
    m.load_state_dict(llama.state_dict())
    with torch.no_grad():
        for layer in m.model.layers:
            a = layer.self_attn
            fused = f(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight], 0))
            q, k, v = torch.split(fused, [64, 32, 32], 0)
            a.q_proj.weight.copy_(q), a.k_proj.weight.copy_(k), a.v_proj.weight.copy_(v)
            a.o_proj.weight.copy_(f(a.o_proj.weight))
            for lin in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                lin.weight.copy_(f(lin.weight))
    _close(R.logits(str(tmp_path), TOK), _ref(m), tol=1e-4)


def test_int4_packing_order():
    vals = torch.tensor([[1, -2, 7, -8]], dtype=torch.int8)
    packed = R.pack_int4(vals)
    # element 0 in the low nibble, element 1 in the high nibble (two's complement)
    assert packed.tolist() == [[((-2 & 0xF) << 4 | 1) - 256, ((-8 & 0xF) << 4 | 7) - 256]]
    assert torch.equal(R.unpack_int4(packed), vals)


# ----------------------------------------------------------------------------
# Negative checks
# ----------------------------------------------------------------------------

def _good_cfg():
    return dict(architecture="LlamaForCausalLM", dtype="float16", hidden_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=100, hidden_act="silu",
                position_embedding_type="rope_gpt_neox", max_position_embeddings=64,
                mapping=dict(world_size=2, tp_size=2, pp_size=1))


def test_check_config():
    assert R.check_config(_good_cfg()) == []
    c = _good_cfg()
    del c["hidden_act"]
    assert any("hidden_act" in p for p in R.check_config(c))
    c = _good_cfg()
    c["mapping"] = dict(world_size=4, tp_size=2, pp_size=1)
    assert any("world_size" in p for p in R.check_config(c))
    c = _good_cfg()
    c["architecture"] = "NotAModel"
    assert any("MODEL_MAP" in p for p in R.check_config(c))
    c = _good_cfg()
    c["quantization"] = {"quant_algo": "INT3"}
    assert any("quant_algo" in p for p in R.check_config(c))
    c = _good_cfg()
    c["mapping"] = dict(world_size=2, tp_size=2, pp_size=1, moe_tp_size=2, moe_ep_size=2)
    assert any("moe_tp_size" in p for p in R.check_config(c))


def test_check_config_gemma_and_falcon_classes():
    """What TensorRT-LLM's Gemma and Falcon classes cannot express (from their sources) is refused."""
    def problems(**kw):
        c = _good_cfg()
        c.update(kw)
        return " ".join(R.check_config(c))

    gemma = dict(architecture="GemmaForCausalLM", hidden_act="gelu", use_parallel_embedding=True)
    assert problems(**gemma) == ""
    assert "use_parallel_embedding" in problems(**{**gemma, "use_parallel_embedding": False})
    assert "embedding_sharding_dim" in problems(**gemma, embedding_sharding_dim=1)
    assert "pipeline stages" in problems(**gemma, mapping=dict(world_size=4, tp_size=2, pp_size=2))
    assert "one projection" in problems(**{**gemma, "hidden_act": "geglu"})
    falcon = dict(architecture="FalconForCausalLM", hidden_act="gelu")
    assert problems(**falcon) == ""
    assert "rotary_pct" in problems(**falcon, rotary_pct=0.5)
    assert "ignores head_size" in problems(**falcon, head_size=32)
    assert "rotary_scaling" in problems(**falcon, rotary_scaling={"type": "linear", "factor": 2.0})


def test_reader_rejects_bad_shape_and_missing_rank(tmp_path, llama):
    from safetensors.torch import load_file
    write_llama(llama, str(tmp_path), tp=2)
    f = tmp_path / "rank1.safetensors"
    t = load_file(str(f))
    t["transformer.layers.1.attention.dense.weight"] = t["transformer.layers.1.attention.dense.weight"][:, :8].contiguous()
    save_file(t, str(f))
    with pytest.raises(AssertionError, match=r"transformer\.layers\.1\.attention\.dense\.weight"):
        R.read_checkpoint(str(tmp_path))
    os.remove(f)
    with pytest.raises(AssertionError, match="rank1.safetensors"):
        R.read_checkpoint(str(tmp_path))


def test_reader_rejects_extra_tensor(tmp_path, llama):
    from safetensors.torch import load_file
    write_llama(llama, str(tmp_path))
    f = tmp_path / "rank0.safetensors"
    t = load_file(str(f))
    t["transformer.layers.0.mlp.fc.bias"] = torch.zeros(96)
    save_file(t, str(f))
    with pytest.raises(AssertionError, match=r"mlp\.fc\.bias"):
        R.read_checkpoint(str(tmp_path))


def test_gpt_rope_partial_rotary_as_gptneox(tmp_path):
    # GPT class + rope_gpt_neox + rotary_pct: TRT-LLM's GPT attention honours rotary_pct; the
    # reader maps it to transformers GPTNeoX (sequential residual, partial_rotary_factor).
    hc = transformers.GPTNeoXConfig(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=128, hidden_act="gelu_new", max_position_embeddings=64,
                                    use_parallel_residual=False, tie_word_embeddings=False,
                                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                     "partial_rotary_factor": 0.5})
    m = _init(transformers.AutoModelForCausalLM.from_config(hc, attn_implementation="eager"), 4)
    sd = {k: v.detach().float() for k, v in m.state_dict().items()}
    H, nh, d, I, tp = 64, 4, 16, 128, 2
    cfg = dict(architecture="GPTForCausalLM", dtype="float32", vocab_size=V, hidden_size=H, num_hidden_layers=2,
               num_attention_heads=nh, intermediate_size=I, hidden_act="gelu", norm_epsilon=hc.layer_norm_eps,
               position_embedding_type="rope_gpt_neox", rotary_pct=0.5, rotary_base=10000.0,
               max_position_embeddings=64, mapping=dict(world_size=tp, tp_size=tp, pp_size=1))
    Vp = math.ceil(V / tp) * tp
    ranks = {}
    for r in range(tp):
        res = {"transformer.vocab_embedding.weight": sd["gpt_neox.embed_in.weight"],
               "transformer.ln_f.weight": sd["gpt_neox.final_layer_norm.weight"],
               "transformer.ln_f.bias": sd["gpt_neox.final_layer_norm.bias"],
               "lm_head.weight": _split(_pad_rows(sd["lm_head.weight"], Vp), tp, r, 0)}
        for i in range(2):
            s, o = f"gpt_neox.layers.{i}.", f"transformer.layers.{i}."
            for a, b in (("input_layernorm", "input_layernorm"), ("post_attention_layernorm", "post_layernorm")):
                res[o + b + ".weight"], res[o + b + ".bias"] = sd[s + a + ".weight"], sd[s + a + ".bias"]
            w = sd[s + "attention.query_key_value.weight"].reshape(nh, 3, d, H).transpose(0, 1)  # [3, nh, d, H]
            bq = sd[s + "attention.query_key_value.bias"].reshape(nh, 3, d).transpose(0, 1)
            res[o + "attention.qkv.weight"] = _split(w, tp, r, 1).reshape(-1, H)
            res[o + "attention.qkv.bias"] = _split(bq, tp, r, 1).reshape(-1)
            res[o + "attention.dense.weight"] = _split(sd[s + "attention.dense.weight"], tp, r, 1)
            res[o + "attention.dense.bias"] = sd[s + "attention.dense.bias"]
            res[o + "mlp.fc.weight"] = _split(sd[s + "mlp.dense_h_to_4h.weight"], tp, r, 0)
            res[o + "mlp.fc.bias"] = _split(sd[s + "mlp.dense_h_to_4h.bias"], tp, r, 0)
            res[o + "mlp.proj.weight"] = _split(sd[s + "mlp.dense_4h_to_h.weight"], tp, r, 1)
            res[o + "mlp.proj.bias"] = sd[s + "mlp.dense_4h_to_h.bias"]
        ranks[r] = res
    _save(str(tmp_path), cfg, ranks)
    _close(R.logits(str(tmp_path), TOK), _ref(m))
