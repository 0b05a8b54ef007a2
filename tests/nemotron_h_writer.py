"""Test-side oracle for hybrid Mamba models: a small random transformers ``NemotronHForCausalLM`` and a writer
that turns its weights into a Megatron ``MambaModel`` / ``HybridModel`` checkpoint (legacy ``torch`` at any
TP, and ``torch_dist`` through ``torch.distributed.checkpoint``), since megatron-core cannot run Mamba layers
on a CPU.

The name and layout mapping follows Megatron-Bridge's documented NemotronH bridge, read at commit
067f987df03b8355b03192d88d70f1709fedf51a of github.com/NVIDIA-NeMo/Megatron-Bridge:
``src/megatron/bridge/models/nemotronh/nemotron_h_bridge.py`` (``mapping_registry``) and
``src/megatron/bridge/models/conversion/param_mapping.py`` (``MambaInProjMapping``, ``MambaConv1dMapping``,
``QKVMapping``, ``ColumnParallelMapping``, ``RowParallelMapping``):

* ``backbone.layers.{i}.norm.weight`` -> the layer's fused TE norm: ``mixer.in_proj.layer_norm_weight`` (M),
  ``self_attention.linear_qkv.layer_norm_weight`` (*), ``mlp.linear_fc1.layer_norm_weight`` (-);
* ``mixer.in_proj.weight`` ``[z | x | B | C | dt]`` -> per TP rank ``[z_r | x_r | B_r | C_r | dt_r]`` (each
  part split in TP contiguous blocks); ``mixer.conv1d.{weight,bias}`` ``[x | B | C]`` likewise per rank;
* ``A_log``, ``D``, ``dt_bias``, ``norm.weight``: column-parallel (dim 0); ``out_proj``: row-parallel (dim 1);
* q/k/v -> ``linear_qkv`` in Megatron's grouped order (per KV group: its query heads, k, v), column-parallel;
  ``o_proj`` -> ``linear_proj`` (row); ``up_proj`` / ``down_proj`` -> ``linear_fc1`` / ``linear_fc2``;
* ``embeddings`` -> ``embedding.word_embeddings``; ``norm_f`` -> ``decoder.final_norm``; ``lm_head`` ->
  ``output_layer``.

The ``torch_dist`` layout is Megatron-Core's own (``MambaMixer.sharded_state_dict``, megatron-core main at
github.com/NVIDIA/Megatron-LM d98e8a64ddf34856e74b24714e3bedb2f5a39553): per-layer global keys,
``in_proj.weight`` saved as five tensors ``in_proj.weight.{z,x,B,C,dt}`` and the conv as
``conv1d.{weight,bias}.{x,B,C}``, each a global tensor whose TP chunks are saved at their offsets. The writer
is kept apart from mexc's own tables: it shares no code with ``mexc.frontends``.

The reference model's mixers run with ``time_step_limit=(0, inf)``: transformers clamps softplus(dt) from
below at ``time_step_min``, Megatron's forward does not (``dt_limit=(0.0, inf)``)."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch

PATTERN = "M-M*-M"
SIZES = {
    "hidden_size": 64,
    "mamba_num_heads": 8,
    "mamba_head_dim": 8,
    "n_groups": 2,
    "ssm_state_size": 16,
    "conv_kernel": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 96,
    "vocab_size": 128,
}


def reference(seed: int = 0, pattern: str = PATTERN, **over):
    """A random ``NemotronHForCausalLM`` (fp32, eval) with every weight perturbed (norms, A_log, D, dt_bias,
    conv biases away from their initial constants)."""
    from transformers import NemotronHConfig, NemotronHForCausalLM

    torch.manual_seed(seed)
    kw = dict(
        SIZES,
        hybrid_override_pattern=pattern,
        layer_norm_epsilon=1e-5,
        mlp_hidden_act="relu2",
        mamba_hidden_act="silu",
        use_conv_bias=True,
        use_bias=False,
        mlp_bias=False,
        attention_bias=False,
        tie_word_embeddings=False,
        max_position_embeddings=64,
        residual_in_fp32=False,
    )
    kw.update(over)
    cfg = NemotronHConfig(**kw)
    cfg._attn_implementation = "eager"
    m = NemotronHForCausalLM(cfg).eval()
    for layer in m.model.layers:  # Megatron's forward: dt_limit=(0.0, inf) (time_step_min=0 breaks HF's init)
        if hasattr(layer.mixer, "time_step_limit"):
            layer.mixer.time_step_limit = (0.0, float("inf"))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.log(torch.rand_like(p) * 3 + 0.5))
            elif name.endswith("dt_bias"):
                p.copy_(torch.randn_like(p) * 0.5 - 1.0)
            elif name.endswith(".D"):
                p.copy_(torch.randn_like(p))
            elif "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.2)
            else:
                p.copy_(torch.randn_like(p) * 0.08)
    return m


def _hf(m) -> dict[str, torch.Tensor]:
    """The HF state dict under the Hub names Megatron-Bridge maps (``backbone.``, where transformers 5 has
    ``model.``)."""
    return {
        ("backbone." + k[len("model.") :] if k.startswith("model.") else k): v.detach().clone()
        for k, v in m.state_dict().items()
    }


def _grouped_qkv(q, k, v, nh, nkv, d):
    """Megatron's linear_qkv rows: per KV group, its nh/nkv query heads, then k, then v (QKVMapping)."""
    H = q.shape[1]
    q, k, v = q.view(nkv, nh // nkv, d, H), k.view(nkv, 1, d, H), v.view(nkv, 1, d, H)
    return torch.cat([q, k, v], 1).reshape(-1, H)


def _per_rank(parts: list[torch.Tensor], tp: int) -> list[torch.Tensor]:
    """``[a | b | ...]`` -> per rank ``[a_r | b_r | ...]`` (MambaInProjMapping / MambaConv1dMapping)."""
    return [torch.cat([p.chunk(tp, 0)[r] for p in parts], 0) for r in range(tp)]


def megatron_tensors(
    m, tp: int
) -> tuple[list[dict[str, torch.Tensor]], dict[str, tuple[str, list[torch.Tensor]]]]:
    """(per-rank legacy state dicts, global torch_dist view ``key -> (kind, per-rank chunks)``; kind ``col`` /
    ``row`` / ``rep``)."""
    c, sd = m.config, _hf(m)
    I, GN, nh = c.mamba_num_heads * c.mamba_head_dim, c.n_groups * c.ssm_state_size, c.mamba_num_heads
    ranks: list[dict[str, torch.Tensor]] = [{} for _ in range(tp)]
    dist: dict[str, tuple[str, list[torch.Tensor]]] = {}

    def put(key, t, kind, legacy=None):
        shards = [t] * tp if kind == "rep" else list(t.chunk(tp, 0 if kind == "col" else 1))
        for r in range(tp):
            ranks[r][key] = (legacy[r] if legacy is not None else shards[r]).contiguous()
        if legacy is None:
            dist[key] = (kind, shards)

    put("embedding.word_embeddings.weight", sd["backbone.embeddings.weight"], "col")
    for i, sym in enumerate(c.hybrid_override_pattern):
        hf, mg = f"backbone.layers.{i}.", f"decoder.layers.{i}."
        norm = sd[hf + "norm.weight"]
        if sym == "M":
            w, cw, cb = (
                sd[hf + "mixer.in_proj.weight"],
                sd[hf + "mixer.conv1d.weight"],
                sd[hf + "mixer.conv1d.bias"],
            )
            ins = list(w.split([I, I, GN, GN, nh], 0))
            convs, cbs = list(cw.split([I, GN, GN], 0)), list(cb.split([I, GN, GN], 0))
            put(mg + "mixer.in_proj.layer_norm_weight", norm, "rep")
            put(mg + "mixer.in_proj.weight", w, "col", legacy=_per_rank(ins, tp))
            put(mg + "mixer.conv1d.weight", cw, "col", legacy=_per_rank(convs, tp))
            put(mg + "mixer.conv1d.bias", cb, "col", legacy=_per_rank(cbs, tp))
            for part, t in zip(["z", "x", "B", "C", "dt"], ins):
                dist[mg + f"mixer.in_proj.weight.{part}"] = ("col", list(t.chunk(tp, 0)))
            for part, t, b in zip(["x", "B", "C"], convs, cbs):
                dist[mg + f"mixer.conv1d.weight.{part}"] = ("col", list(t.chunk(tp, 0)))
                dist[mg + f"mixer.conv1d.bias.{part}"] = ("col", list(b.chunk(tp, 0)))
            for p in ("A_log", "D", "dt_bias", "norm.weight"):
                put(mg + "mixer." + p, sd[hf + "mixer." + p], "col")
            put(mg + "mixer.out_proj.weight", sd[hf + "mixer.out_proj.weight"], "row")
        elif sym == "*":
            qkv = _grouped_qkv(
                *(sd[hf + f"mixer.{p}_proj.weight"] for p in "qkv"),
                c.num_attention_heads,
                c.num_key_value_heads,
                c.head_dim,
            )
            put(mg + "self_attention.linear_qkv.layer_norm_weight", norm, "rep")
            put(mg + "self_attention.linear_qkv.weight", qkv, "col")
            put(mg + "self_attention.linear_proj.weight", sd[hf + "mixer.o_proj.weight"], "row")
        elif sym == "-":
            put(mg + "mlp.linear_fc1.layer_norm_weight", norm, "rep")
            put(mg + "mlp.linear_fc1.weight", sd[hf + "mixer.up_proj.weight"], "col")
            put(mg + "mlp.linear_fc2.weight", sd[hf + "mixer.down_proj.weight"], "row")
        else:
            raise ValueError(f"the writer has no mapping for layer symbol {sym!r}")
    put("decoder.final_norm.weight", sd["backbone.norm_f.weight"], "rep")
    put("output_layer.weight", sd["lm_head.weight"], "col")
    return ranks, dist


def megatron_args(m, tp: int, **extra) -> argparse.Namespace:
    """The args ``pretrain_mamba.py`` saves for this model (the ones that describe it; training-only ones
    left out)."""
    c = m.config
    a = {
        "num_layers": len(c.hybrid_override_pattern),
        "hidden_size": c.hidden_size,
        "ffn_hidden_size": c.intermediate_size,
        "num_attention_heads": c.num_attention_heads,
        "group_query_attention": True,
        "num_query_groups": c.num_key_value_heads,
        "kv_channels": c.head_dim,
        "max_position_embeddings": c.max_position_embeddings,
        "seq_length": c.max_position_embeddings,
        "padded_vocab_size": c.vocab_size,
        "vocab_size": c.vocab_size,
        "untie_embeddings_and_output_weights": True,
        "normalization": "RMSNorm",
        "layernorm_epsilon": c.layer_norm_epsilon,
        "squared_relu": True,
        "swiglu": False,
        "add_bias_linear": False,
        "add_qkv_bias": False,
        "position_embedding_type": "none",
        "hybrid_override_pattern": c.hybrid_override_pattern,
        "is_hybrid_model": True,
        "mamba_state_dim": c.ssm_state_size,
        "mamba_head_dim": c.mamba_head_dim,
        "mamba_num_groups": c.n_groups,
        "mamba_num_heads": c.mamba_num_heads,
        "spec": ["megatron.core.models.mamba.mamba_layer_specs", "mamba_stack_spec"],
        "tensor_model_parallel_size": tp,
        "pipeline_model_parallel_size": 1,
        "expert_model_parallel_size": 1,
        "params_dtype": torch.float32,
        "bf16": False,
        "fp16": False,
        "transformer_impl": "transformer_engine",
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
    }
    a.update(extra)
    return argparse.Namespace(**a)


def write_legacy(m, root: Path, tp: int, iteration: int = 1, conv_key: str = "conv1d.weight", **args) -> Path:
    """``root/iter_NNNNNNN/mp_rank_TT/model_optim_rng.pt`` + ``latest_checkpointed_iteration.txt``.
    ``conv_key="conv1d_weight"``: the key megatron-core saves since conv1d became direct mixer params."""
    ranks, _ = megatron_tensors(m, tp)
    it = root / f"iter_{iteration:07d}"
    for r, state in enumerate(ranks):
        if conv_key != "conv1d.weight":
            state = {
                k.replace("mixer.conv1d.weight", "mixer.conv1d_weight").replace(
                    "mixer.conv1d.bias", "mixer.conv1d_bias"
                ): v
                for k, v in state.items()
            }
        d = it / f"mp_rank_{r:02d}"
        d.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "args": megatron_args(m, tp, **args),
                "checkpoint_version": 3.0,
                "iteration": iteration,
                "model": state,
            },
            d / "model_optim_rng.pt",
        )
    (root / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    return root


def write_dist(m, root: Path, tp: int, iteration: int = 1, **args) -> Path:
    """A ``torch_dist`` save: ``.metadata`` + ``*.distcp`` with every TP-split tensor's chunks at their global
    offsets (one ``ShardedTensor`` holding the TP ranks' shards), ``common.pt`` and ``metadata.json``."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed._shard.metadata import ShardMetadata
    from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor, ShardedTensorMetadata
    from torch.distributed._shard.sharded_tensor.metadata import TensorProperties

    _, tensors = megatron_tensors(m, tp)
    it = root / f"iter_{iteration:07d}"
    it.mkdir(parents=True, exist_ok=True)
    own = not dist.is_initialized()
    if own:
        store = tempfile.mktemp(prefix="mexc-dcp-store-")
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        state = {}
        for key, (kind, shards) in tensors.items():
            if kind == "rep" or tp == 1:
                state[key] = shards[0].contiguous()
                continue
            dim = 0 if kind == "col" else 1
            full = list(shards[0].shape)
            full[dim] *= tp
            metas, local = [], []
            for r, s in enumerate(shards):
                off = [0] * s.dim()
                off[dim] = r * s.shape[dim]
                md = ShardMetadata(off, list(s.shape), "rank:0/cpu")
                metas.append(md)
                local.append(Shard(s.contiguous(), md))
            props = TensorProperties(dtype=shards[0].dtype)
            state[key] = ShardedTensor._init_from_local_shards_and_global_metadata(
                local, ShardedTensorMetadata(metas, torch.Size(full), props)
            )
        dcp.save(state, checkpoint_id=str(it))
    finally:
        if own:
            dist.destroy_process_group()
            os.unlink(store) if os.path.exists(store) else None
    torch.save(
        {"args": megatron_args(m, tp, **args), "checkpoint_version": 3.0, "iteration": iteration},
        it / "common.pt",
    )
    (it / "metadata.json").write_text(
        json.dumps(
            {
                "sharded_backend": "torch_dist",
                "sharded_backend_version": 1,
                "common_backend": "torch",
                "common_backend_version": 1,
            }
        )
    )
    (root / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    return root


def write(m, root: Path, tp: int, fmt: str, **kw) -> Path:
    return (write_legacy if fmt == "torch" else write_dist)(m, Path(root), tp, **kw)


def logits(m, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return m(tokens).logits
