"""Self-check of the real-megatron-core fixture maker (tests/fixture_makers/megatron_core.py).

The plain-torch Llama forward below is written from the state_dict only; matching the
reference logits guards the fixture maker itself (and documents the on-disk layout).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from megatron_fixtures import have_megatron_core, load_fixture_info, load_reference, megatron_checkpoint

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not have_megatron_core(), reason="megatron-core not installed"),
]


def _check_reference(d):
    ref = load_reference(d)
    assert set(ref) == {"tokens", "position_ids", "logits"}
    assert ref["tokens"].shape == (2, 8) and ref["tokens"].dtype == torch.long
    assert ref["position_ids"].shape == (2, 8)
    assert ref["logits"].shape == (2, 8, 128) and ref["logits"].dtype == torch.float32
    assert torch.isfinite(ref["logits"]).all()
    return ref


def test_llama_tp2_torch_layout():
    d = megatron_checkpoint("llama", tp=2, pp=1, fmt="torch")
    ckpt = d / "ckpt"
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "10"
    for r in range(2):
        assert (ckpt / "iter_0000010" / f"mp_rank_{r:02d}" / "model_optim_rng.pt").is_file()
    _check_reference(d)
    info = load_fixture_info(d)
    assert (info["kind"], info["tp"], info["pp"], info["format"]) == ("llama", 2, 1, "torch")


def test_gpt_pp2_torch_dist_layout():
    d = megatron_checkpoint("gpt", tp=1, pp=2, fmt="torch_dist")
    it = d / "ckpt" / "iter_0000010"
    assert (d / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "10"
    assert (it / "metadata.json").is_file() and (it / ".metadata").is_file()
    assert list(it.glob("*.distcp"))
    _check_reference(d)


# ---------------------------------------------------------------------------------------
# independent plain-torch forward (Llama kind, TP1/PP1 legacy checkpoint)
# ---------------------------------------------------------------------------------------
def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x, pos, base, rot_dim):
    # non-interleaved (rotate_half) RoPE on the first rot_dim channels; x [b, s, h, d]
    inv = 1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=torch.float32) / rot_dim))
    freqs = pos[..., None].float() * inv  # [b, s, rot/2]
    emb = torch.cat([freqs, freqs], -1)[:, :, None, :]
    xr, xp = x[..., :rot_dim], x[..., rot_dim:]
    x1, x2 = xr.chunk(2, -1)
    rot = torch.cat([-x2, x1], -1)
    return torch.cat([xr * emb.cos() + rot * emb.sin(), xp], -1)


def llama_forward(sd, args, tokens, pos):
    H, nh, ng, d = args.hidden_size, args.num_attention_heads, args.num_query_groups, args.kv_channels
    hpg, eps = nh // ng, args.norm_epsilon
    b, s = tokens.shape
    x = sd["embedding.word_embeddings.weight"][tokens]
    mask = torch.ones(s, s, dtype=torch.bool).triu(1)
    for i in range(args.num_layers):
        p = f"decoder.layers.{i}."
        h = _rms(x, sd[p + "input_layernorm.weight"], eps)
        qkv = (h @ sd[p + "self_attention.linear_qkv.weight"].T).view(b, s, ng, (hpg + 2) * d)
        q = qkv[..., : hpg * d].reshape(b, s, ng * hpg, d)
        k = qkv[..., hpg * d : hpg * d + d]
        v = qkv[..., hpg * d + d :]
        rot = int(d * args.rotary_percent)
        q, k = _rope(q, pos, args.rotary_base, rot), _rope(k, pos, args.rotary_base, rot)
        k = k.repeat_interleave(hpg, dim=2)
        v = v.repeat_interleave(hpg, dim=2)
        att = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)
        att = att.masked_fill(mask, float("-inf")).softmax(-1)
        o = torch.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, s, nh * d)
        x = x + o @ sd[p + "self_attention.linear_proj.weight"].T
        h = _rms(x, sd[p + "pre_mlp_layernorm.weight"], eps)
        gate, up = (h @ sd[p + "mlp.linear_fc1.weight"].T).chunk(2, -1)
        x = x + (F.silu(gate) * up) @ sd[p + "mlp.linear_fc2.weight"].T
    x = _rms(x, sd["decoder.final_layernorm.weight"], eps)
    return x @ sd["output_layer.weight"].T


def test_llama_tp1_plain_torch_forward_matches_megatron():
    d = megatron_checkpoint("llama", tp=1, pp=1, fmt="torch")
    ref = _check_reference(d)
    ck = torch.load(
        d / "ckpt" / "iter_0000010" / "mp_rank_00" / "model_optim_rng.pt",
        map_location="cpu",
        weights_only=False,  # args Namespace holds megatron enums
    )
    assert ck["checkpoint_version"] == 3.0 and ck["iteration"] == 10
    args = ck["args"]
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == (1, 1)
    assert args.padded_vocab_size == 128 and args.vocab_size == 99  # NullTokenizer: 99 ids + its eod = 100
    sd = {k: v for k, v in ck["model"].items() if torch.is_tensor(v)}
    with torch.no_grad():
        logits = llama_forward(sd, args, ref["tokens"], ref["position_ids"])
    torch.testing.assert_close(logits, ref["logits"], atol=1e-5, rtol=0)
