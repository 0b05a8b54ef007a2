"""Hand-built tiny IR models whose weights come from random Hugging Face models (an independent oracle)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from mexc import ir


def hf_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, rms_norm_eps=1e-5,
                      tie_word_embeddings=False, rope_theta=10000.0)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norms
        for n, p in m.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    return m


def hf_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=128, n_positions=32, n_embd=64, n_layer=2, n_head=4, activation_function="gelu",
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5)
    m = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "ln" in n or "bias" in n:
                p.add_(torch.randn_like(p) * 0.1)
    return m


def _store(model, tmp: Path) -> ir.SafetensorsStore:
    sd = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()
          if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    save_file(sd, str(tmp / "weights.safetensors"))
    return ir.SafetensorsStore("w", str(tmp))


def llama_ir(model, tmp: Path) -> ir.Model:
    """Llama with separate q/k/v params (HF layout), untied head, GQA, rope, swiglu."""
    st = _store(model, tmp)
    c = model.config
    H, nh, nkv = c.hidden_size, c.num_attention_heads, c.num_key_value_heads
    d = H // nh

    def w(key, *shape):
        return ir.load(st, f"weights.safetensors:{key}", ir.TensorType(ir.f32, shape))

    cfg = ir.ModelConfig(family="llama", hidden_size=H, num_layers=c.num_hidden_layers, vocab_size=c.vocab_size,
                         max_position_embeddings=c.max_position_embeddings)
    b = ir.Builder(cfg, stores={"w": st})
    x = b.node("embedding", b.input_ids, params={"word": w("model.embed_tokens.weight", c.vocab_size, H)})
    F = c.intermediate_size
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        h = b.node("norm", x, layer=i, params={"weight": w(p + "input_layernorm.weight", H)}, kind="rmsnorm",
                   eps=c.rms_norm_eps)
        a = b.node("attention", h, layer=i, num_heads=nh, num_kv_heads=nkv, head_dim=d, position="rope",
                   rope=ir.Rope(base=float(c.rope_parameters["rope_theta"]) if hasattr(c, "rope_parameters") and c.rope_parameters else 10000.0),
                   params={"q": w(p + "self_attn.q_proj.weight", nh * d, H),
                           "k": w(p + "self_attn.k_proj.weight", nkv * d, H),
                           "v": w(p + "self_attn.v_proj.weight", nkv * d, H),
                           "proj": w(p + "self_attn.o_proj.weight", H, nh * d)})
        x = b.node("add", x, a, layer=i)
        h = b.node("norm", x, layer=i, params={"weight": w(p + "post_attention_layernorm.weight", H)},
                   kind="rmsnorm", eps=c.rms_norm_eps)
        m = b.node("mlp", h, layer=i, activation="silu", gated=True,
                   params={"gate": w(p + "mlp.gate_proj.weight", F, H), "up": w(p + "mlp.up_proj.weight", F, H),
                           "fc2": w(p + "mlp.down_proj.weight", H, F)})
        x = b.node("add", x, m, layer=i)
    x = b.node("norm", x, params={"weight": w("model.norm.weight", H)}, kind="rmsnorm", eps=c.rms_norm_eps)
    return b.output(b.node("lm_head", x, params={"weight": w("lm_head.weight", c.vocab_size, H)}))


def gpt2_ir(model, tmp: Path) -> ir.Model:
    """GPT-2: LayerNorm with bias, fused [Q;K;V] (concat layout), gelu, learned positions, tied head."""
    st = _store(model, tmp)
    c = model.config
    H, nh, L = c.n_embd, c.n_head, c.n_layer
    d = H // nh
    F = 4 * H

    def w(key, *shape):
        return ir.load(st, f"weights.safetensors:{key}", ir.TensorType(ir.f32, shape))

    def t(key, i, o):  # Conv1D [in, out] -> [out, in]
        return ir.derive("transpose", w(key, i, o), d0=0, d1=1)

    cfg = ir.ModelConfig(family="gpt", hidden_size=H, num_layers=L, vocab_size=c.vocab_size,
                         max_position_embeddings=c.n_positions)
    b = ir.Builder(cfg, stores={"w": st})
    word = w("transformer.wte.weight", c.vocab_size, H)
    x = b.node("embedding", b.input_ids, params={"word": word, "position": w("transformer.wpe.weight", c.n_positions, H)})
    ln = dict(kind="layernorm", eps=c.layer_norm_epsilon)
    lay = dict(kind="concat", q=nh, kv=nh, d=d)
    for i in range(L):
        p = f"transformer.h.{i}."
        h = b.node("norm", x, layer=i, params={"weight": w(p + "ln_1.weight", H), "bias": w(p + "ln_1.bias", H)}, **ln)
        a = b.node("attention", h, layer=i, num_heads=nh, num_kv_heads=nh, head_dim=d, position="none",
                   params={"qkv": ir.derive("tag_qkv", t(p + "attn.c_attn.weight", H, 3 * H), **lay),
                           "qkv_bias": ir.derive("tag_qkv", w(p + "attn.c_attn.bias", 3 * H), **lay),
                           "proj": t(p + "attn.c_proj.weight", H, H), "proj_bias": w(p + "attn.c_proj.bias", H)})
        x = b.node("add", x, a, layer=i)
        h = b.node("norm", x, layer=i, params={"weight": w(p + "ln_2.weight", H), "bias": w(p + "ln_2.bias", H)}, **ln)
        m = b.node("mlp", h, layer=i, activation="gelu", gated=False,
                   params={"fc1": t(p + "mlp.c_fc.weight", H, F), "fc1_bias": w(p + "mlp.c_fc.bias", F),
                           "fc2": t(p + "mlp.c_proj.weight", F, H), "fc2_bias": w(p + "mlp.c_proj.bias", H)})
        x = b.node("add", x, m, layer=i)
    x = b.node("norm", x, params={"weight": w("transformer.ln_f.weight", H), "bias": w("transformer.ln_f.bias", H)}, **ln)
    return b.output(b.node("lm_head", x, params={"weight": word}, tied=True))


TOKENS = torch.tensor([[1, 5, 9, 23, 42, 77, 3, 99], [0, 64, 31, 8, 15, 2, 50, 11]])


def random_llama(hidden=1024, layers=8, vocab=32000, ffn=2816, heads=16, kv=4, dtype=ir.f32,
                 store=None) -> ir.Model:
    """A Llama-shaped IR model whose weights come from ``store`` (default: a seeded generator, nothing on disk)."""
    st = store or ir.RandomStore("rnd", seed=1)
    d = hidden // heads
    lay = ir.QKVLayout("grouped", heads, kv, d)

    def w(key, *shape, layout=None):
        return ir.load(st, key, ir.TensorType(dtype, shape, layout))

    cfg = ir.ModelConfig(family="llama", hidden_size=hidden, num_layers=layers, vocab_size=vocab, dtype=dtype)
    b = ir.Builder(cfg, stores={st.name: st})
    x = b.node("embedding", b.input_ids, params={"word": w("emb", vocab, hidden)})
    for i in range(layers):
        h = b.node("norm", x, layer=i, params={"weight": w(f"{i}.in.norm", hidden)}, kind="rmsnorm")
        a = b.node("attention", h, layer=i, num_heads=heads, num_kv_heads=kv, head_dim=d,
                   params={"qkv": w(f"{i}.qkv", lay.rows, hidden, layout=lay), "proj": w(f"{i}.proj", hidden, hidden)})
        x = b.node("add", x, a, layer=i)
        h = b.node("norm", x, layer=i, params={"weight": w(f"{i}.post.norm", hidden)}, kind="rmsnorm")
        m = b.node("mlp", h, layer=i, activation="silu", gated=True,
                   params={"gate": w(f"{i}.gate", ffn, hidden), "up": w(f"{i}.up", ffn, hidden),
                           "fc2": w(f"{i}.fc2", hidden, ffn)})
        x = b.node("add", x, m, layer=i)
    x = b.node("norm", x, params={"weight": w("final.norm", hidden)}, kind="rmsnorm")
    return b.output(b.node("lm_head", x, params={"weight": w("head", vocab, hidden)}))
