"""The per-layer node builders of the Megatron lift (:mod:`.lift`): attention sinks, MLP, multi-latent attention,
Mamba-2 mixer, MoE (experts, router biases, shared experts), each from the checkpoint's roles (``(role, layer,
expert) -> Recipe``) into the IR builder. Every weight stays a lazy recipe."""

from __future__ import annotations

from ...errors import CheckpointError, ConfigError
from ...ir import Builder, Recipe, derive
from .config import MegatronArch


def _get(roles, role, layer=None, expert=None, required=True, where=""):
    r = roles.get((role, layer, expert))
    if r is None and required:
        raise CheckpointError(f"{where}: no tensor for {role}" + (f" of layer {layer}" if layer is not None else ""),
                              hint="the checkpoint is incomplete, or its args describe another architecture")
    return r


def _split_gated(w: Recipe) -> tuple[Recipe, Recipe]:
    n = w.type.shape[0] if len(w.type.shape) == 2 or len(w.type.shape) == 1 else w.type.shape[-2]
    dim = 0 if len(w.type.shape) <= 2 else len(w.type.shape) - 2
    return (derive("slice", w, dim=dim, start=0, stop=n // 2), derive("slice", w, dim=dim, start=n // 2, stop=n))


def _sinks(roles, arch: MegatronArch, i: int, where) -> Recipe | None:
    """The attention sinks of layer ``i`` (megatron-core DotProductAttention.softmax_offset, [num_heads]):
    learnable: the saved tensor; off-by-one: zeros (a constant 0 logit, not saved); vanilla: none."""
    saved = roles.get(("sinks", i, None))
    if arch.softmax_type == "learnable":
        if saved is None:
            raise CheckpointError(f"{where}: softmax_type is learnable but layer {i} has no "
                                  "self_attention.core_attention.softmax_offset", hint="the checkpoint is incomplete, "
                                  "or set softmax_type in --config")
        if saved.type.shape != (arch.num_heads,):
            raise CheckpointError(f"{where}: layer {i} softmax_offset is {list(saved.type.shape)}, expected "
                                  f"[{arch.num_heads}] (one per head)", hint="fix num_attention_heads with --config")
        return saved
    if saved is not None:
        raise CheckpointError(f"{where}: layer {i} has a softmax_offset but softmax_type is {arch.softmax_type}",
                              hint="set softmax_type: learnable in --config")
    if arch.softmax_type == "off-by-one":
        return derive("zeros", shape=(arch.num_heads,), dtype=arch.dtype.value)
    return None


def _glu(arch: MegatronArch) -> dict:
    """The clamped-GLU attrs (ops.py ``_GLU``); megatron-core reads them only for a gated MLP."""
    return {"glu_clamp": arch.glu_clamp, "glu_offset": arch.glu_offset} if arch.gated else {}


def _mlp(b: Builder, roles, arch: MegatronArch, i: int, h, where):
    if roles.get(("router.weight", i, None)) is not None:
        return _moe(b, roles, arch, i, h, where)
    fc1 = _get(roles, "fc1.weight", i, where=where)
    fc1_b = roles.get(("fc1.bias", i, None))
    params: dict[str, Recipe | None] = {"fc2": _get(roles, "fc2.weight", i, where=where),
                                        "fc2_bias": roles.get(("fc2.bias", i, None))}
    if arch.gated:
        if fc1.type.shape[0] != 2 * arch.ffn_hidden_size:
            raise CheckpointError(f"{where}: layer {i} gated fc1 has {fc1.type.shape[0]} rows, expected "
                                  f"2 x ffn_hidden_size = {2 * arch.ffn_hidden_size}", hint="fix ffn_hidden_size")
        params["gate"], params["up"] = _split_gated(fc1)
        if fc1_b is not None:
            params["gate_bias"], params["up_bias"] = _split_gated(fc1_b)
    else:
        params["fc1"], params["fc1_bias"] = fc1, fc1_b
    return b.node("mlp", h, layer=i, params=params, activation=arch.activation, gated=arch.gated, **_glu(arch))


def _mla(b: Builder, roles, arch: MegatronArch, i: int, h, where):
    """A multi-latent attention node (ops.py ``mla``): the latent norms are the checkpoint's q_layernorm /
    kv_layernorm (absent without qk_layernorm: Megatron then uses IdentityOp)."""
    params = {n: roles.get((f"mla.{n}", i, None)) for n in ("q", "q_down", "q_up", "kv_down", "kv_up", "kv_norm")}
    params.update(q_norm=roles.get(("q_norm.weight", i, None)), proj=_get(roles, "proj.weight", i, where=where),
                  proj_bias=roles.get(("proj.bias", i, None)))
    need = ("q_down", "q_up") if arch.q_lora_rank else ("q",)
    for n in (*need, "kv_down", "kv_up"):
        if params[n] is None:
            raise CheckpointError(f"{where}: no tensor for the multi-latent attention's {n} of layer {i}",
                                  hint="the checkpoint is incomplete, or its args (q_lora_rank) describe another "
                                       "architecture")
    latent = arch.normalization if params["kv_norm"] is not None else "none"
    return b.node("mla", h, layer=i, params=params, num_heads=arch.num_heads, kv_lora_rank=arch.kv_lora_rank,
                  qk_head_dim=arch.qk_head_dim, qk_rope_dim=arch.qk_rope_dim, v_head_dim=arch.v_head_dim,
                  rope=arch.rope, latent_norm=latent, latent_norm_eps=arch.norm_eps,
                  softmax_scale=arch.mla_softmax_scale)


_MAMBA_PARTS = {"in_proj": ("in_z", "in_x", "in_B", "in_C", "in_dt"), "conv": ("conv_x", "conv_B", "conv_C"),
                "conv_bias": ("conv_x_bias", "conv_B_bias", "conv_C_bias")}


def _mamba(b: Builder, roles, arch: MegatronArch, i: int, h, where):
    """A Mamba-2 mixer node: the fused in_proj / conv of a legacy save split into their parts, or the parts a
    torch_dist save holds; conv weights ``[C, 1, K]`` become ``[C, K]``."""
    I, GN, nh = arch.mamba_num_heads * arch.mamba_head_dim, arch.mamba_num_groups * arch.mamba_state_dim, \
        arch.mamba_num_heads
    sizes = {"in_proj": [I, I, GN, GN, nh], "conv": [I, GN, GN], "conv_bias": [I, GN, GN]}
    params: dict[str, Recipe | None] = {}
    for fused, names in _MAMBA_PARTS.items():
        w = roles.get((f"mamba.{fused}", i, None))
        if w is None:
            for n in names:
                params[n] = roles.get((f"mamba.{n}", i, None))
            continue
        if w.type.shape[0] != sum(sizes[fused]):
            raise CheckpointError(f"{where}: layer {i} mixer {fused} has {w.type.shape[0]} rows, the mamba args "
                                  f"imply {sum(sizes[fused])} ({'+'.join(map(str, sizes[fused]))})",
                                  hint="fix mamba_num_heads / mamba_head_dim / mamba_num_groups / mamba_state_dim "
                                       "with --config")
        at = 0
        for n, rows in zip(names, sizes[fused]):
            params[n] = derive("slice", w, dim=0, start=at, stop=at + rows)
            at += rows
    for n in (*_MAMBA_PARTS["conv"], *_MAMBA_PARTS["in_proj"]):
        if params.get(n) is None:
            raise CheckpointError(f"{where}: no tensor for the mixer's {n} of layer {i}",
                                  hint="the checkpoint is incomplete, or its args describe another architecture")
    for n in (*_MAMBA_PARTS["conv"], *_MAMBA_PARTS["conv_bias"]):
        w = params.get(n)
        if w is not None and len(w.type.shape) == 3:
            if w.type.shape[1] != 1:
                raise CheckpointError(f"{where}: layer {i} conv1d weight is {list(w.type.shape)}, expected a "
                                      "depthwise [channels, 1, kernel]", hint="is this a Mamba-2 mixer?")
            params[n] = derive("index", derive("transpose", w, d0=0, d1=1), i=0)
    for n in ("A_log", "D", "dt_bias", "norm", "out"):
        params[n] = _get(roles, f"mamba.{n}", i, where=where)
    return b.node("mamba", h, layer=i, params=params, num_heads=nh, head_dim=arch.mamba_head_dim,
                  num_groups=arch.mamba_num_groups, state_dim=arch.mamba_state_dim,
                  conv_kernel=params["conv_x"].type.shape[-1])


def _expert_bias(roles, which: str, i: int, E: int) -> Recipe | None:
    """The experts' ``linear_{which}`` biases stacked to ``[E, ...]`` (torch_dist saves them stacked), or None."""
    stacked = roles.get((f"experts.{which}.bias", i, None))
    if stacked is not None or ("expert." + which + ".bias", i, 0) not in roles:
        return stacked
    return derive("stack", *[roles[(f"expert.{which}.bias", i, e)] for e in range(E)])


def _moe(b: Builder, roles, arch: MegatronArch, i, h, where):
    E = arch.num_experts
    if E <= 0:
        raise ConfigError(f"{where}: layer {i} has a router but num_experts is not set", hint="set num_experts")
    stacked = roles.get(("experts.fc1.weight", i, None))
    if stacked is not None:
        fc1, fc2 = stacked, _get(roles, "experts.fc2.weight", i, where=where)
    else:
        missing = [e for e in range(E) if ("expert.fc1.weight", i, e) not in roles]
        if missing:
            raise CheckpointError(f"{where}: layer {i} misses experts {missing[:8]}",
                                  hint="copy every expert-parallel rank (mp_rank_*_EEE)")
        fc1 = derive("stack", *[roles[("expert.fc1.weight", i, e)] for e in range(E)])
        fc2 = derive("stack", *[roles[("expert.fc2.weight", i, e)] for e in range(E)])
    if fc2.type.shape[-1] != arch.moe_ffn_hidden_size:   # fc2 [E, H, F]: every TP / ETP shard merged
        raise CheckpointError(f"{where}: layer {i} experts' linear_fc2 is {list(fc2.type.shape)} (ffn "
                              f"{fc2.type.shape[-1]}, all tensor-parallel shards merged) but "
                              f"moe_ffn_hidden_size={arch.moe_ffn_hidden_size} (saved args or --set)",
                              hint=f"give the checkpoint's value: --set moe_ffn_hidden_size={fc2.type.shape[-1]}")
    params: dict[str, Recipe | None] = {"router": roles[("router.weight", i, None)], "fc2": fc2,
                                        "router_bias": roles.get(("router.bias", i, None)),
                                        "fc2_bias": _expert_bias(roles, "fc2", i, E)}
    if arch.gated:
        params["gate"], params["up"] = _split_gated(fc1)
    else:
        params["fc1"] = fc1
    b1 = _expert_bias(roles, "fc1", i, E)
    if b1 is not None and arch.gated:   # [E, 2F] = [gate | up] per expert
        n = b1.type.shape[-1]
        params["gate_bias"], params["up_bias"] = (derive("slice", b1, dim=1, start=0, stop=n // 2),
                                                  derive("slice", b1, dim=1, start=n // 2, stop=n))
    elif b1 is not None:
        params["fc1_bias"] = b1
    bias = roles.get(("router.expert_bias", i, None))
    if (bias is not None) != arch.moe_expert_bias or (bias is not None and arch.moe_score != "sigmoid"):
        raise CheckpointError(f"{where}: layer {i} {'has' if bias is not None else 'has no'} router.expert_bias "
                              f"but the args say moe_router_enable_expert_bias={arch.moe_expert_bias}, "
                              f"moe_router_score_function={arch.moe_score!r} (Megatron: expert bias with sigmoid only)",
                              hint="fix the args with --config")
    if bias is not None:
        params["expert_bias"] = bias
    shared = _shared_expert(roles, arch, i, params, where)
    # group-limited routing that keeps every group (group_topk = num_groups) masks nothing: plain top-k, exactly
    # (megatron-core moe_utils.group_limited_topk), so targets without groups take it too
    groups = 0 < arch.moe_group_topk < arch.moe_num_groups
    return b.node("moe", h, layer=i, params=params, num_experts=E, top_k=arch.moe_topk, shared_expert=shared,
                  num_groups=arch.moe_num_groups if groups else 0, group_topk=arch.moe_group_topk if groups else 0,
                  activation=arch.activation, gated=arch.gated, score=arch.moe_score, **_glu(arch),
                  pre_softmax=arch.moe_pre_softmax, topk_scale=arch.moe_topk_scale,
                  norm_topk=arch.moe_score == "sigmoid" and arch.moe_topk > 1)  # Megatron renormalizes sigmoid top-k


def check_moe_layers(roles, arch: MegatronArch, where: str) -> None:
    """The layers with a router (``mlp.router.weight``) must be the MoE layers ``moe_layer_freq`` gives
    (:func:`.config_features.moe_layer_pattern`, megatron-core's expansion); hybrid models place MoE by their
    pattern instead. Raises :class:`CheckpointError` naming the first layer that differs."""
    if not arch.num_experts or arch.hybrid_pattern:
        return
    from .config_features import moe_layer_pattern

    want = moe_layer_pattern(arch.moe_layer_freq, arch.num_layers, where)
    have = tuple(int(roles.get(("router.weight", i, None)) is not None) for i in range(arch.num_layers))
    if want != have:
        i = next(j for j in range(arch.num_layers) if want[j] != have[j])
        raise CheckpointError(f"{where}: layer {i} {'has' if have[i] else 'has no'} router but the args say "
                              f"moe_layer_freq={str(arch.moe_layer_freq)[:40]} (MoE layers {list(want)}, the "
                              f"checkpoint's {list(have)})",
                              hint=f"fix the args: --set moe_layer_freq=[{','.join(map(str, have))}]")


def _shared_expert(roles, arch: MegatronArch, i, params, where) -> str:
    """Megatron's SharedExpertMLP of layer ``i`` into ``params`` (shared_gate/up or shared_fc1, shared_fc2,
    shared_expert_gate); returns the moe node's ``shared_expert`` attribute. The args and tensors must agree."""
    fc1 = roles.get(("shared.fc1.weight", i, None))
    gate = roles.get(("shared.gate_weight", i, None))
    if fc1 is None:
        if arch.moe_shared_size or gate is not None:
            raise CheckpointError(f"{where}: layer {i} has no shared_experts.linear_fc1.weight but the args set "
                                  f"moe_shared_expert_intermediate_size={arch.moe_shared_size}",
                                  hint="the checkpoint is incomplete, or fix the args with --config")
        return "none"
    S = arch.moe_shared_size
    if fc1.type.shape[0] != (2 if arch.gated else 1) * S or (gate is not None) != arch.moe_shared_gate:
        raise CheckpointError(f"{where}: layer {i} shared expert fc1 has {fc1.type.shape[0]} rows and "
                              f"{'a' if gate is not None else 'no'} gate_weight; the args say "
                              f"moe_shared_expert_intermediate_size={S or None}, moe_shared_expert_gate="
                              f"{arch.moe_shared_gate}", hint="fix the args with --config")
    if arch.gated:
        params["shared_gate"], params["shared_up"] = _split_gated(fc1)
    else:
        params["shared_fc1"] = fc1
    params["shared_fc2"] = _get(roles, "shared.fc2.weight", i, where=where)
    if gate is None:
        return "ungated"
    params["shared_expert_gate"] = gate
    return "sigmoid-gated"
