"""Lift a Megatron checkpoint into the IR: keys and shapes only, every weight a lazy recipe.

The IR holds *logical* (unsharded, global-layer) weights. For legacy files the recipes merge the TP shards
(``concat`` of ``load``s; gated fc1 halves split per shard), renumber stage-local layers to global ones
(virtual-pipeline chunks included) and map local experts to global ones. For ``torch_dist`` the merge is
already done on disk; layer-stacked tensors become ``load(key@layer)``.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from ...errors import CheckpointError
from ...ir import Builder, ModelConfig, Model, Parallelism, QKVLayout, Recipe, derive, load
from ...ir.types import TensorType
from . import mapping
from .arguments import apply as apply_arguments
from .config import MegatronArch, from_args, load_overrides
from .config_features import layer_window
from .lift_layers import _get, _mamba, _mla, _mlp, _sinks, check_moe_layers
from .overrides import check_shapes, merge_overrides
from .replicated import replicated as replicated_copies
from .reader import CheckpointInfo, DcpStore, MegatronTorchStore, open_checkpoint, tensor_type

_CHUNK = re.compile(r"^model(\d*)/(.*)$")


def lift(path: str | Path, *, iteration: int | None = None, config: str | Path | None = None,
         overrides: dict[str, Any] | None = None, replicated: str | None = None) -> Model:
    """Lift the checkpoint at ``path`` (a Megatron ``--save`` dir or one ``iter_*`` dir) into a Model.

    ``replicated`` (check | rank0 | mean) says what to do with the TP ranks' copies of a replicated tensor
    (see :mod:`.replicated`). Saved args that change the math and are not honoured stop the lift
    (:mod:`.arguments`); args the table does not know are listed in ``model.meta["unknown_args"]``."""
    info = open_checkpoint(path, iteration)
    ov, origins = merge_overrides(config, overrides, load_overrides)
    if replicated is not None:
        ov["replicated"], origins["replicated"] = replicated, f"--replicated {replicated}"
    where = str(info.iter_dir / ("common.pt" if info.format == "torch_dist" else "mp_rank_*/model_optim_rng.pt"))
    if info.args_missing and not ov:
        first = min(info.rank_files.values()) if info.rank_files else where
        raise CheckpointError(f"{first}: the checkpoint has no saved args (a release/ or converted checkpoint)",
                              hint="describe the architecture with --config FILE.yaml or --set FIELD=VALUE "
                                   "(fields: `mexc inspect` of a similar checkpoint shows them)")
    arch = from_args(info.args, where, ov, origins)
    if info.checkpoint_version is not None and float(info.checkpoint_version) < 2.0:
        raise CheckpointError(f"{info.iter_dir}: checkpoint_version {info.checkpoint_version} uses an old QKV "
                              "row order", hint="re-save it with a Megatron-LM from 2020 or later (version >= 2.0)")
    if info.format == "torch":
        roles, store = _roles_legacy(info, arch)
    else:
        roles, store = _roles_dist(info, arch)
    note = roles.pop(_DROPPED, None)
    model = _build(arch, roles, store, info)
    if note:
        model.meta["lift_note"] = note
    unknown = apply_arguments(info.args).unknown
    if unknown:
        model.meta["unknown_args"] = ",".join(unknown)
    if arch.replicated != "check":
        model.meta["replicated"] = arch.replicated
    from ...ir import problems, verify

    check_shapes(problems(model), ov, origins)
    verify(model, context=f"(lifted from {info.iter_dir})")
    return model


# ---------------------------------------------------------------------------------------- legacy


def _roles_legacy(info: CheckpointInfo, arch: MegatronArch):
    store = MegatronTorchStore("ckpt", str(info.iter_dir.resolve()))
    # (role, layer, expert) -> {tp_rank: (key, type)}; layer numbering resolved below
    found: dict[tuple, dict[int, tuple[str, TensorType, str]]] = defaultdict(dict)
    local_layers: dict[tuple[int, int], set[int]] = defaultdict(set)  # (pp, chunk) -> local layer ids
    unmapped: list[str] = []
    dropped: set[str] = set()
    per_file: list[tuple] = []
    for (t, p, e), f in sorted(info.rank_files.items()):
        rank_dir = f.parent.name
        state = store.state(rank_dir)
        for key, val in state.items():
            m = _CHUNK.match(key)
            if m is None:
                continue
            chunk = int(m.group(1) or 0)
            r = mapping.match(m.group(2))
            if r is None:
                if hasattr(val, "shape"):
                    unmapped.append(f"{rank_dir}: {m.group(2)}")
                continue
            role, merge, layer, expert = r
            if merge == "mtp" and hasattr(val, "shape"):
                dropped.add(m.group(2))
            if merge in ("skip", "mtp") or not hasattr(val, "shape"):
                continue
            if layer is not None:
                local_layers[(p, chunk)].add(layer)
            if merge in ("grouped1", "grouped2"):   # one entry per local expert: (which, expert, experts)
                n = max(arch.num_experts // max(arch.ep, 1), 1)
                for j in range(n):
                    per_file.append((t, p, e, chunk, role, (merge, j, n, None), layer, j, f"{rank_dir}:{key}",
                                     tensor_type(val), f))
                continue
            per_file.append((t, p, e, chunk, role, merge, layer, expert, f"{rank_dir}:{key}", tensor_type(val), f))
    if unmapped:
        raise CheckpointError(f"{info.iter_dir}: {len(unmapped)} tensor(s) no mapping rule knows: "
                              + ", ".join(unmapped[:8]) + (" ..." if len(unmapped) > 8 else ""),
                              hint="this architecture is not supported yet; mexc never drops weights silently "
                                   "(see `mexc inspect --rules`)")
    # global layer offsets: stages (and VP chunks) in Megatron's order: chunk-major, then pipeline rank
    counts = {k: (max(v) + 1) for k, v in local_layers.items()}
    order = sorted(counts, key=lambda pc: (pc[1], pc[0]))
    offset, run = {}, 0
    for pc in order:
        offset[pc] = run
        run += counts[pc]
    if local_layers and run != arch.num_layers:
        raise CheckpointError(f"{info.iter_dir}: the rank files hold {run} layers, the args say num_layers="
                              f"{arch.num_layers}", hint="a pipeline stage is missing, or fix num_layers with --config")
    n_local_experts = arch.num_experts // max(arch.ep, 1) if arch.num_experts else 0
    # experts are TP-split only when expert_tensor_parallel_size == tp; with 1 every file holds whole experts
    etp = info.expert_tp or arch.tp
    if etp not in (1, arch.tp):
        raise CheckpointError(f"{info.iter_dir}: expert_tensor_parallel_size={etp} with tensor_model_parallel_size="
                              f"{arch.tp} is not read yet (only 1 or equal to tp)",
                              hint="re-save with --expert-tensor-parallel-size 1 or equal to the TP size")
    whole_experts = etp == 1 and arch.tp > 1
    for t, p, e, chunk, role, merge, layer, expert, key, typ, f in per_file:
        g_layer = offset[(p, chunk)] + layer if layer is not None else None
        g_expert = e * n_local_experts + expert if expert is not None else None
        slot = (role, g_layer, g_expert)
        # one copy per shard: dense weights are the same on every EP rank, whole experts on every TP rank
        shard = 0 if expert is not None and whole_experts else t
        prev = found[slot].get(shard)
        if prev is not None and prev[2] != str(f) and (expert is None or whole_experts):
            if prev[1] != typ:
                raise CheckpointError(f"{f}: {role} (layer {g_layer}) has {typ}, {prev[2]} has {prev[1]}",
                                      hint="copies of one weight disagree across ranks; the checkpoint is "
                                           "inconsistent")
            continue
        if expert is not None and whole_experts:
            merge = (*merge[:3], "rep") if isinstance(merge, tuple) else "rep"
        if t in found[slot] and expert is None:
            prev_key = found[slot][t][0]
            if role != "lm_head.tied_copy":
                raise CheckpointError(f"{info.iter_dir}: {role} (layer {g_layer}) found twice: {prev_key} and {key}",
                                      hint="the checkpoint has duplicate keys for one weight")
        found[slot][shard] = (key, typ, str(f), merge)
    roles: dict[tuple, Recipe] = {}
    for (role, layer, expert), shards in found.items():
        tp = 1 if expert is not None and whole_experts else arch.tp
        roles[(role, layer, expert)] = _merge(store, role, layer, shards, arch, info, tp)
    roles[_DROPPED] = _drop_mtp(dropped, arch, info)
    return roles, store


_DROPPED = ("mtp", None, None)  # roles' entry for the note on dropped mtp.* tensors (not a weight)


def _drop_mtp(keys: set[str], arch: MegatronArch, info: CheckpointInfo) -> str | None:
    """The compile note for the multi-token-prediction tensors left out, or None when there are none; refused
    when the args do not say the model has MTP layers (a weight is never dropped unexplained)."""
    if not keys:
        return None
    if not arch.mtp_num_layers:
        raise CheckpointError(f"{info.iter_dir}: {len(keys)} multi-token-prediction tensor(s) (mtp.*) but the saved "
                              "args have no mtp_num_layers", hint="set mtp_num_layers with --set / --config if the "
                              "model was trained with MTP heads (they are then left out of the output)")
    return (f"left out the {arch.mtp_num_layers} multi-token-prediction layer(s) ({len(keys)} mtp.* tensors; "
            "mtp_num_layers): the main head's logits do not read them, speculative decoding with them is not "
            "written")


def _merge(store, role, layer, shards, arch: MegatronArch, info, tp: int) -> Recipe:
    ranks = sorted(shards)
    if ranks != list(range(tp)):
        missing = sorted(set(range(tp)) - set(ranks))
        raise CheckpointError(f"{info.iter_dir}: {role} (layer {layer}) is missing on tp rank(s) {missing}",
                              hint="copy every mp_rank_* directory of the checkpoint")
    merge = shards[0][3]
    leaves = [load(store, shards[r][0], shards[r][1]) for r in ranks]
    if isinstance(merge, tuple):                 # legacy GroupedMLP: this expert's view of each rank's tensor
        which, j, n, then = merge
        leaves = [_grouped_expert(leaf, which, j, n, arch, f"{info.iter_dir}: {shards[r][0]}")
                  for r, leaf in zip(ranks, leaves)]
        merge = then or ("gated?" if which == "grouped1" else "row")
    if merge == "gated?":
        merge = "gated" if arch.gated else "col"
    if merge in ("mamba_in", "mamba_conv") and len(leaves) > 1:
        return _merge_mamba(leaves, merge, arch, f"{info.iter_dir}: {role} (layer {layer})")
    if merge == "rep" or len(leaves) == 1:
        for r in ranks[1:]:
            if shards[r][1] != shards[0][1]:
                raise CheckpointError(f"{shards[r][2]}: {role} (layer {layer}) is {shards[r][1]} but rank 0 has "
                                      f"{shards[0][1]}", hint="the TP ranks disagree on a replicated tensor")
        where = f"{info.iter_dir}: {shards[0][0].split(':', 1)[-1]} ({role}" + (
            f" of layer {layer})" if layer is not None else ")")
        return replicated_copies(leaves, [Path(shards[r][2]).parent.name for r in ranks], where, arch.replicated)
    dim = 1 if merge == "row" else 0
    for r in ranks[1:]:
        a, b = shards[r][1], shards[0][1]
        if len(a.shape) != len(b.shape) or any(a.shape[i] != b.shape[i] for i in range(len(a.shape))) or a.dtype != b.dtype:
            raise CheckpointError(f"{shards[r][2]}: {role} (layer {layer}) shard is {a}, rank 0's is {b}",
                                  hint="shapes disagree across TP ranks; the checkpoint is inconsistent")
    if merge == "gated":
        halves = []
        for leaf in leaves:
            n = leaf.type.shape[0]
            if n % 2:
                raise CheckpointError(f"{info.iter_dir}: gated fc1 shard {leaf.attrs['key']} has odd rows {n}")
            halves.append((derive("slice", leaf, dim=0, start=0, stop=n // 2),
                           derive("slice", leaf, dim=0, start=n // 2, stop=n)))
        return derive("concat", *[h[0] for h in halves], *[h[1] for h in halves], dim=0)
    return derive("concat", *leaves, dim=dim)


def _grouped_expert(leaf: Recipe, which: str, j: int, n: int, arch: MegatronArch, where: str) -> Recipe:
    """Expert ``j`` of a legacy GroupedMLP rank tensor as the SequentialMLP layout, a pure view and transpose:
    ``weight1`` [H, n*X] holds the experts' [n, H, X] (megatron-core GroupedMLP.forward:
    ``weight1.view(n, H, -1)``; X = this rank's [gate_r | up_r] columns with GLU) -> [X, H]; ``weight2``
    [n*F_r, H] holds [n, F_r, H] -> [H, F_r] (``sharded_state_dict`` transposes them alike)."""
    H, shape = arch.hidden_size, leaf.type.shape
    rows, cols = (shape[1], shape[0]) if which == "grouped1" else (shape[0], shape[1])
    if len(shape) != 2 or (shape[0] if which == "grouped1" else shape[1]) != H or rows % n:
        raise CheckpointError(f"{where} is {list(shape)}, not a GroupedMLP {'weight1' if which == 'grouped1' else 'weight2'}"
                              f" of {n} local experts with hidden {H}", hint="fix num_experts / hidden_size / "
                              "expert_model_parallel_size with --config")
    inner = (n, H, rows // n) if which == "grouped1" else (n, rows // n, H)
    one = derive("index", derive("reshape", leaf, shape=inner), i=j)
    return derive("transpose", one, d0=0, d1=1)


def _merge_mamba(leaves, merge, arch: MegatronArch, where: str) -> Recipe:
    """Each rank's ``[z_r; x_r; B_r; C_r; dt_r]`` (in_proj) or ``[x_r; B_r; C_r]`` (conv1d) -> the global
    ``[z; x; B; C; dt]`` / ``[x; B; C]`` (megatron/core/ssm/mamba_mixer.py: in_proj_partition_sizes)."""
    tp = len(leaves)
    I, GN = arch.mamba_num_heads * arch.mamba_head_dim, arch.mamba_num_groups * arch.mamba_state_dim
    sizes = [I, I, GN, GN, arch.mamba_num_heads] if merge == "mamba_in" else [I, GN, GN]
    if any(n % tp for n in sizes) or any(leaf.type.shape[0] != sum(sizes) // tp for leaf in leaves):
        raise CheckpointError(f"{where}: shard rows {leaves[0].type.shape[0]} do not fit the mamba args split "
                              f"{tp} ways ({'/'.join(map(str, sizes))})", hint="fix mamba_num_heads / "
                              "mamba_head_dim / mamba_num_groups / mamba_state_dim with --config")
    parts, at = [], 0
    for n in sizes:
        parts += [derive("slice", leaf, dim=0, start=at, stop=at + n // tp) for leaf in leaves]
        at += n // tp
    return derive("concat", *parts, dim=0)


# ---------------------------------------------------------------------------------------- torch_dist

_STACKED = re.compile(r"^decoder\.layers\.(?!\d+\.)(.*)$")


def _roles_dist(info: CheckpointInfo, arch: MegatronArch):
    store = info.store if info.store is not None else DcpStore("ckpt", str(info.iter_dir.resolve()))
    roles: dict[tuple, Recipe] = {}
    unmapped, dropped = [], set()
    for key, (dt, shape) in sorted(store.tensors().items()):
        m = _STACKED.match(key)
        items = []
        if m:
            if not shape or shape[0] != arch.num_layers:
                raise CheckpointError(f"{info.iter_dir}: stacked tensor {key} has shape {list(shape)}, expected "
                                      f"{arch.num_layers} layers first", hint="fix num_layers with --config")
            for i in range(arch.num_layers):
                items.append((f"decoder.layers.{i}.{m.group(1)}", f"{key}@{i}", tuple(shape[1:])))
        else:
            items.append((key, key, tuple(shape)))
        for norm_key, skey, sh in items:
            r = mapping.match(norm_key)
            if r is None:
                unmapped.append(key)
                break
            role, merge, layer, expert = r
            if merge == "mtp":
                dropped.add(norm_key)
            if merge in ("skip", "mtp"):
                continue
            roles[(role, layer, expert)] = _dist_load(store, skey, tensor_type((dt, sh)))
    if unmapped:
        raise CheckpointError(f"{info.iter_dir}: {len(unmapped)} tensor(s) no mapping rule knows: "
                              + ", ".join(unmapped[:8]), hint="this architecture is not supported yet; mexc never "
                              "drops weights silently (see `mexc inspect --rules`)")
    # torch_dist gated fc1 is already [all gate; all up] (TP-invariant); _build splits it into gate and up
    roles[_DROPPED] = _drop_mtp(dropped, arch, info)
    return roles, store


def _dist_load(store: DcpStore, key: str, typ: TensorType) -> Recipe:
    """A torch_dist tensor: the concat of its TP chunks where they tile it along one dim (each chunk is then
    read in place, and a reshard to the same split reads a chunk as is), else one load."""
    split = store.split(key)
    if split is None:
        return load(store, key, typ)
    dim, chunks = split
    return derive("concat", *[load(store, k, TensorType(typ.dtype, sizes)) for k, sizes in chunks], dim=dim)


# ---------------------------------------------------------------------------------------- IR


def _build(arch: MegatronArch, roles, store, info: CheckpointInfo) -> Model:
    where = str(info.iter_dir)
    H = arch.hidden_size
    cfg = ModelConfig(family=arch.family, hidden_size=H, num_layers=arch.num_layers, vocab_size=arch.vocab_size,
                      max_position_embeddings=arch.max_position_embeddings, dtype=arch.dtype)
    b = Builder(cfg, parallel=Parallelism(), stores={store.name: store},
                meta={"source": "megatron", "format": info.format, "iteration": info.iteration,
                      "source_tp": arch.tp, "source_pp": arch.pp, "source_ep": arch.ep, "source_vp": arch.vp,
                      "checkpoint": str(info.root.resolve())})
    word = _get(roles, "embedding.word", where=where)
    if word.type.shape[0] != arch.padded_vocab_size:
        raise CheckpointError(f"{where}: word embeddings have {word.type.shape[0]} rows, args say "
                              f"padded_vocab_size={arch.padded_vocab_size}", hint="fix it with --config")
    pos = roles.get(("embedding.position", None, None))
    if arch.position == "learned_absolute" and pos is None:
        raise CheckpointError(f"{where}: learned_absolute positions but no position_embeddings tensor",
                              hint="set position_embedding_type in --config")
    x = b.node("embedding", b.input_ids, params={"word": word, "position": pos}, scale=arch.embedding_scale)
    norm_kw = dict(kind=arch.normalization, eps=arch.norm_eps, zero_centered=arch.zero_centered_gamma)
    check_moe_layers(roles, arch, where)
    lay = QKVLayout("grouped", arch.num_heads, arch.num_kv_heads, arch.head_dim)
    for i in range(arch.num_layers):
        sym = arch.hybrid_pattern[i] if arch.hybrid_pattern else None
        if sym is not None and sym != "*":  # one mixer per layer: norm -> mamba | mlp | moe -> add
            norm_role = "mamba_norm" if sym == "M" else "post_norm"
            h = b.node("norm", x, layer=i, params={"weight": _get(roles, norm_role + ".weight", i, where=where),
                                                   "bias": roles.get((norm_role + ".bias", i, None))}, **norm_kw)
            mixer = _mamba(b, roles, arch, i, h, where) if sym == "M" else _mlp(b, roles, arch, i, h, where)
            x = b.node("add", x, mixer, layer=i)
            continue
        h = b.node("norm", x, layer=i, params={"weight": _get(roles, "input_norm.weight", i, where=where),
                                               "bias": roles.get(("input_norm.bias", i, None))}, **norm_kw)
        if arch.mla:
            x = b.node("add", x, _mla(b, roles, arch, i, h, where), layer=i)
            h2 = b.node("norm", x, layer=i, params={"weight": _get(roles, "post_norm.weight", i, where=where),
                                                    "bias": roles.get(("post_norm.bias", i, None))}, **norm_kw)
            x = b.node("add", x, _mlp(b, roles, arch, i, h2, where), layer=i)
            continue
        qkv = _get(roles, "qkv.weight", i, where=where)
        gate_rows = arch.num_heads * arch.head_dim if arch.output_gate else 0
        if qkv.type.shape != (lay.rows + gate_rows, H):
            raise CheckpointError(f"{where}: layer {i} linear_qkv is {list(qkv.type.shape)}, the args imply "
                                  f"[{lay.rows + gate_rows}, {H}] (heads={arch.num_heads}, "
                                  f"groups={arch.num_kv_heads}, kv_channels={arch.head_dim}, "
                                  f"attention_output_gate={arch.output_gate})",
                                  hint="fix the head counts with --config")
        qb = roles.get(("qkv.bias", i, None))
        gate = gate_b = None
        if arch.output_gate:
            qkv, gate = mapping.ungate_qkv(qkv, arch.num_heads, arch.num_kv_heads, arch.head_dim)
            if qb is not None:
                qb, gate_b = mapping.ungate_qkv(qb, arch.num_heads, arch.num_kv_heads, arch.head_dim)
        qkv = derive("tag_qkv", qkv, kind="grouped", q=lay.q_heads, kv=lay.kv_heads, d=lay.head_dim)
        if qb is not None:
            qb = derive("tag_qkv", qb, kind="grouped", q=lay.q_heads, kv=lay.kv_heads, d=lay.head_dim)
        qk_norm = arch.normalization if roles.get(("q_norm.weight", i, None)) is not None else "none"
        qk_norm = "l2" if arch.qk_l2_norm else qk_norm   # megatron-core's spec: L2Norm wins over qk_layernorm
        sinks = _sinks(roles, arch, i, where)
        attn = b.node("attention", h, layer=i,
                      params={"qkv": qkv, "qkv_bias": qb, "proj": _get(roles, "proj.weight", i, where=where),
                              "proj_bias": roles.get(("proj.bias", i, None)),
                              "q_norm": roles.get(("q_norm.weight", i, None)) if qk_norm != "l2" else None,
                              "k_norm": roles.get(("k_norm.weight", i, None)) if qk_norm != "l2" else None,
                              "gate": gate, "gate_bias": gate_b, "sinks": sinks},
                      sinks=sinks is not None,
                      num_heads=arch.num_heads, num_kv_heads=arch.num_kv_heads, head_dim=arch.head_dim,
                      position="rope" if arch.position == "rope" and not (arch.no_rope and arch.no_rope[i])
                      else "none", rope=arch.rope, qk_norm=qk_norm,
                      qk_norm_eps=arch.norm_eps if qk_norm != "none" else 1e-5,
                      softmax_scale=arch.softmax_scale, window=layer_window(arch, i),
                      **({"output_gate": True} if arch.output_gate else {}))
        post_w = roles.get(("post_norm.weight", i, None))
        if arch.parallel_block:
            m_in = h if post_w is None else b.node("norm", x, layer=i, params={
                "weight": post_w, "bias": roles.get(("post_norm.bias", i, None))}, **norm_kw)
            mlp = _mlp(b, roles, arch, i, m_in, where)
            x = b.node("add", x, attn, mlp, layer=i)
            continue
        x = b.node("add", x, attn, layer=i)
        if sym == "*":
            continue
        if post_w is None:
            raise CheckpointError(f"{where}: layer {i} has no pre-MLP norm", hint="is this a parallel-attention "
                                  "model? set parallel_block: true in --config")
        h2 = b.node("norm", x, layer=i, params={"weight": post_w, "bias": roles.get(("post_norm.bias", i, None))},
                    **norm_kw)
        x = b.node("add", x, _mlp(b, roles, arch, i, h2, where), layer=i)
    fx = b.node("norm", x, params={"weight": _get(roles, "final_norm.weight", where=where),
                                   "bias": roles.get(("final_norm.bias", None, None))}, **norm_kw)
    head = roles.get(("lm_head.weight", None, None))
    tied = head is None
    if head is None:
        if not arch.tied:
            raise CheckpointError(f"{where}: untie_embeddings_and_output_weights is set but there is no "
                                  "output_layer.weight", hint="the last pipeline stage's file is missing or incomplete")
        head = word
    logits = b.node("lm_head", fx, params={"weight": head}, tied=tied)
    return b.output(logits)


__all__ = ["lift"]
