"""Write a synthetic Megatron-LM (mcore, local spec) checkpoint of a real model shape, fast.

Random bf16 weights in the exact on-disk layout Megatron-LM uses, without megatron-core:

* ``torch`` (legacy): ``latest_checkpointed_iteration.txt`` and
  ``iter_0000001/mp_rank_TT[_PPP]/model_optim_rng.pt`` holding ``{'args', 'checkpoint_version': 3.0,
  'iteration': 1, 'model'}``; per-rank TP shards (QKV rows = whole query groups of the rank, ``linear_proj`` /
  ``linear_fc2`` split on dim 1, gated ``linear_fc1`` = ``[gate_r; up_r]``), stage-local layer numbers.
* ``torch_dist``: written with plain ``torch.distributed.checkpoint`` (a custom save planner, no process
  group): global layer-stacked tensors (``decoder.layers.self_attention.linear_qkv.weight [L, rows, H]`` ...),
  TE-style norm names, chunks laid out as a TP=``tp`` Megatron save writes them (one chunk per layer and TP
  rank; gated fc1 as gate_r at fragment r and up_r at fragment r + tp), ``_extra_state`` byte items,
  ``common.pt`` with the args and ``metadata.json``.

Weights are not statistically meaningful: a 4 Mi-element block of N(0, 0.02) bf16 values (finite, no NaN/inf
bit patterns) is tiled over each tensor from a random offset, so writing runs at memcpy + disk speed.

    python -m mexc.tools.synth_checkpoint --preset 1b --format torch --tp 2 --out /tmp/ckpt-1b
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ITERATION = 1


@dataclass(frozen=True)
class Preset:
    name: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    ffn_hidden_size: int
    vocab_size: int
    max_position_embeddings: int = 4096
    rotary_base: int = 10000

    @property
    def kv_channels(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def padded_vocab(self, tp: int, divisible_by: int = 128) -> int:
        m = divisible_by * tp
        return -(-self.vocab_size // m) * m

    def shapes(self, tp: int = 1) -> dict[str, tuple[int, ...]]:
        """Global (unsharded) shape of every weight of one layer and of the model's ends."""
        H, F, d = self.hidden_size, self.ffn_hidden_size, self.kv_channels
        rows = (self.num_attention_heads + 2 * self.num_query_groups) * d
        V = self.padded_vocab(tp)
        return {"embedding": (V, H), "qkv": (rows, H), "proj": (H, self.num_attention_heads * d),
                "fc1": (2 * F, H), "fc2": (H, F), "norm": (H,), "output": (V, H)}

    def param_count(self, tp: int = 1) -> int:
        s = self.shapes(tp)
        n = lambda k: _numel(s[k])  # noqa: E731
        per_layer = n("qkv") + n("proj") + n("fc1") + n("fc2") + 2 * n("norm")
        return self.num_layers * per_layer + n("embedding") + n("output") + n("norm")

    def largest_tensor_bytes(self, tp: int = 1) -> int:
        """Largest single *global* tensor in bf16 (what a TP=1 target holds)."""
        return 2 * max(_numel(v) for v in self.shapes(tp).values())


PRESETS = {
    "tiny": Preset("tiny", 2, 128, 4, 2, 352, 1000, max_position_embeddings=256),
    "1b": Preset("1b", 16, 2048, 16, 8, 5632, 32000),
    "llama2-7b": Preset("llama2-7b", 32, 4096, 32, 32, 11008, 32000),
    "llama3-8b": Preset("llama3-8b", 32, 4096, 32, 8, 14336, 128256, max_position_embeddings=8192,
                        rotary_base=500000),
    "13b": Preset("13b", 40, 5120, 40, 40, 13824, 32000),
}


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# ---------------------------------------------------------------------------------------------- data


class Filler:
    """Cheap pseudo-random bf16 tensors: a random block tiled from a random offset (memcpy speed)."""

    def __init__(self, seed: int = 0, block: int = 1 << 22):
        g = torch.Generator().manual_seed(seed)
        base = (torch.randn(block, generator=g) * 0.02).to(torch.bfloat16)
        self.pool = torch.cat([base, base])        # any window of `block` elements is a valid slice
        self.block = block
        self.g = g

    def tensor(self, shape, *, center: float = 0.0) -> torch.Tensor:
        out = torch.empty(shape, dtype=torch.bfloat16)
        flat = out.view(-1)
        n = flat.numel()
        start = int(torch.randint(0, self.block, (1,), generator=self.g))
        pos = 0
        while pos < n:
            k = min(self.block, n - pos)
            flat[pos:pos + k].copy_(self.pool[start:start + k])
            pos += k
        if center:
            out += center
        return out


def make_args(p: Preset, *, tp: int, pp: int, ckpt_format: str) -> argparse.Namespace:
    """The architecture-defining Megatron-LM training args (plain types only: no megatron enums)."""
    return argparse.Namespace(
        num_layers=p.num_layers, hidden_size=p.hidden_size, ffn_hidden_size=p.ffn_hidden_size,
        num_attention_heads=p.num_attention_heads, kv_channels=p.kv_channels,
        group_query_attention=p.num_query_groups != p.num_attention_heads, num_query_groups=p.num_query_groups,
        normalization="RMSNorm", norm_epsilon=1e-5, apply_layernorm_1p=False, swiglu=True, squared_relu=False,
        openai_gelu=False, add_bias_linear=False, add_qkv_bias=False, qk_layernorm=False,
        apply_residual_connection_post_layernorm=False, position_embedding_type="rope",
        use_rotary_position_embeddings=True, rotary_base=p.rotary_base, rotary_percent=1.0, rotary_interleaved=False,
        rotary_seq_len_interpolation_factor=None, use_rope_scaling=False, rope_scaling_factor=8.0,
        untie_embeddings_and_output_weights=True, vocab_size=p.vocab_size - 1,  # NullTokenizer adds its eod id
        padded_vocab_size=p.padded_vocab(tp),
        make_vocab_size_divisible_by=128, tokenizer_type="NullTokenizer",
        max_position_embeddings=p.max_position_embeddings, seq_length=p.max_position_embeddings,
        encoder_seq_length=p.max_position_embeddings,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, context_parallel_size=1,
        expert_model_parallel_size=1, expert_tensor_parallel_size=tp, virtual_pipeline_model_parallel_size=None,
        num_layers_per_virtual_pipeline_stage=None, decoder_first_pipeline_num_layers=None,
        decoder_last_pipeline_num_layers=None, account_for_embedding_in_pipeline_split=False,
        account_for_loss_in_pipeline_split=False, sequence_parallel=False,
        num_experts=None, moe_ffn_hidden_size=None, moe_router_topk=2, moe_layer_freq=1, moe_grouped_gemm=False,
        multi_latent_attention=False,
        params_dtype=torch.bfloat16, bf16=True, fp16=False, fp32_residual_connection=False,
        transformer_impl="local", spec=None, use_legacy_models=False, use_mcore_models=True,
        ckpt_format=ckpt_format, use_dist_ckpt=ckpt_format != "torch", iteration=ITERATION,
        train_iters=ITERATION, no_save_optim=True, no_save_rng=True, seed=1234,
        world_size=tp * pp, data_parallel_size=1, micro_batch_size=1, global_batch_size=1,
    )


def _write_tracker(out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest_checkpointed_iteration.txt").write_text(str(ITERATION))
    d = out / f"iter_{ITERATION:07d}"
    d.mkdir(exist_ok=True)
    return d


# ---------------------------------------------------------------------------------------------- legacy


def legacy_rank_state(p: Preset, fill: Filler, *, tp: int, pp: int, pp_rank: int,
                      replicated: Filler | None = None) -> OrderedDict:
    """One rank's ``model`` state dict (mcore local spec): TP shards, stage-local layer numbers. Replicated
    tensors (norms) come from ``replicated``, which the caller re-creates with one seed for every TP rank of a
    stage, so that the copies are identical, as in a real save."""
    rep = replicated or fill
    if p.num_layers % pp:
        raise ValueError(f"{p.num_layers} layers do not split evenly over pp={pp}")
    if p.num_query_groups % tp or p.num_attention_heads % tp or p.ffn_hidden_size % tp:
        raise ValueError(f"preset {p.name} does not split over tp={tp}")
    s = p.shapes(tp)
    H, F = p.hidden_size, p.ffn_hidden_size
    V = s["embedding"][0]
    sd: OrderedDict = OrderedDict()
    if pp_rank == 0:
        sd["embedding.word_embeddings.weight"] = fill.tensor((V // tp, H))
    for i in range(p.num_layers // pp):
        k = f"decoder.layers.{i}."
        sd[k + "input_layernorm.weight"] = rep.tensor((H,), center=1.0)
        sd[k + "self_attention.linear_proj.weight"] = fill.tensor((H, s["proj"][1] // tp))
        sd[k + "self_attention.linear_proj._extra_state"] = None
        sd[k + "self_attention.linear_qkv.weight"] = fill.tensor((s["qkv"][0] // tp, H))  # whole groups
        sd[k + "self_attention.linear_qkv._extra_state"] = None
        sd[k + "pre_mlp_layernorm.weight"] = rep.tensor((H,), center=1.0)
        sd[k + "mlp.linear_fc1.weight"] = fill.tensor((2 * F // tp, H))                    # [gate_r; up_r]
        sd[k + "mlp.linear_fc1._extra_state"] = None
        sd[k + "mlp.linear_fc2.weight"] = fill.tensor((H, F // tp))
        sd[k + "mlp.linear_fc2._extra_state"] = None
    if pp_rank == pp - 1:
        sd["decoder.final_layernorm.weight"] = rep.tensor((H,), center=1.0)
        sd["output_layer.weight"] = fill.tensor((V // tp, H))
        sd["output_layer._extra_state"] = None
    return sd


def write_legacy(p: Preset, out: Path, *, tp: int = 2, pp: int = 1, seed: int = 0) -> Path:
    d = _write_tracker(out)
    fill = Filler(seed)
    args = make_args(p, tp=tp, pp=pp, ckpt_format="torch")
    for pp_rank in range(pp):
        for tp_rank in range(tp):
            name = f"mp_rank_{tp_rank:02d}" + (f"_{pp_rank:03d}" if pp > 1 else "")
            (d / name).mkdir(exist_ok=True)
            model = legacy_rank_state(p, fill, tp=tp, pp=pp, pp_rank=pp_rank,
                                      replicated=Filler(seed + 7919 * (pp_rank + 1)))
            torch.save({"args": args, "checkpoint_version": 3.0, "iteration": ITERATION, "model": model},
                       d / name / "model_optim_rng.pt")
            del model
    return out


# ---------------------------------------------------------------------------------------------- torch_dist


def dist_items(p: Preset, *, tp: int) -> list[tuple[str, tuple, tuple, tuple, float]]:
    """(key, global shape, chunk offsets, chunk sizes, center) of every chunk a TP=``tp`` Megatron save writes."""
    s = p.shapes(tp)
    L, H, F = p.num_layers, p.hidden_size, p.ffn_hidden_size
    V, rows, proj_in = s["embedding"][0], s["qkv"][0], s["proj"][1]
    items = []
    for r in range(tp):
        items.append(("embedding.word_embeddings.weight", (V, H), (r * V // tp, 0), (V // tp, H), 0.0))
    for layer in range(L):
        items.append(("decoder.layers.self_attention.linear_qkv.layer_norm_weight", (L, H), (layer, 0), (1, H), 1.0))
        items.append(("decoder.layers.mlp.linear_fc1.layer_norm_weight", (L, H), (layer, 0), (1, H), 1.0))
        for r in range(tp):
            items.append(("decoder.layers.self_attention.linear_qkv.weight", (L, rows, H),
                          (layer, r * rows // tp, 0), (1, rows // tp, H), 0.0))
            items.append(("decoder.layers.self_attention.linear_proj.weight", (L, H, proj_in),
                          (layer, 0, r * proj_in // tp), (1, H, proj_in // tp), 0.0))
            for frag in (r, r + tp):  # swiglu factory: gate_r at fragment r, up_r at fragment r + tp
                items.append(("decoder.layers.mlp.linear_fc1.weight", (L, 2 * F, H),
                              (layer, frag * F // tp, 0), (1, F // tp, H), 0.0))
            items.append(("decoder.layers.mlp.linear_fc2.weight", (L, H, F),
                          (layer, 0, r * F // tp), (1, H, F // tp), 0.0))
    items.append(("decoder.final_layernorm.weight", (H,), (0,), (H,), 1.0))
    for r in range(tp):
        items.append(("output_layer.weight", (V, H), (r * V // tp, 0), (V // tp, H), 0.0))
    return items


def _dist_planner(p: Preset, tp: int, fill: Filler):
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
    from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

    class SynthPlanner(DefaultSavePlanner):
        """Plans Megatron's chunks and generates each chunk's data only when the writer asks for it."""

        def __init__(self):
            super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
            self.centers = {}

        def create_local_plan(self):
            items = []
            for key, gshape, off, size, center in dist_items(p, tp=tp):
                idx = MetadataIndex(key, torch.Size(off))
                self.centers[idx] = (size, center)
                items.append(WriteItem(index=idx, type=WriteItemType.SHARD, tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets=torch.Size(off), sizes=torch.Size(size)),
                    properties=TensorProperties(dtype=torch.bfloat16), size=torch.Size(gshape))))
            for layer in range(p.num_layers):  # TE/local extra state: ShardedObjects keyed by layer
                for mod in ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1",
                            "mlp.linear_fc2"):
                    idx = MetadataIndex(f"decoder.layers.{mod}._extra_state/shard_{layer}_{p.num_layers}")
                    items.append(WriteItem(index=idx, type=WriteItemType.BYTE_IO))
            self.plan = SavePlan(items)
            return self.plan

        def resolve_data(self, write_item):
            if write_item.type == WriteItemType.BYTE_IO:
                buf = io.BytesIO()
                torch.save(None, buf)
                buf.seek(0)
                return buf
            size, center = self.centers[write_item.index]
            return fill.tensor(size, center=center)

    return SynthPlanner()


def write_dist(p: Preset, out: Path, *, tp: int = 2, seed: int = 0, threads: int = 2) -> Path:
    import warnings

    import torch.distributed.checkpoint as dcp

    d = _write_tracker(out)
    fill = Filler(seed)
    from torch.distributed.checkpoint.metadata import StorageMeta

    class Writer(dcp.FileSystemWriter):
        # torch's writer records the checkpoint id as a pathlib.Path; Megatron's records a str (as the real
        # fixtures show): written like Megatron's (mexc reads both).
        def storage_meta(self):
            return StorageMeta(checkpoint_id=str(self.checkpoint_id), save_id=self.save_id)

    writer = Writer(str(d), single_file_per_rank=True, thread_count=threads, sync_files=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no process group: saving as a single process"
        dcp.save({}, storage_writer=writer, planner=_dist_planner(p, tp, fill), no_dist=True)
    args = make_args(p, tp=tp, pp=1, ckpt_format="torch_dist")
    torch.save({"args": args, "checkpoint_version": 3.0, "iteration": ITERATION,
                "content_metadata": {"singleton_local_shards": False,
                                     "distrib_optim_sharding_type": "fully_reshardable"}}, d / "common.pt")
    (d / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                                                 "common_backend": "torch", "common_backend_version": 1}))
    return out


# ---------------------------------------------------------------------------------------------- api


def write_checkpoint(preset: str | Preset, out: str | Path, fmt: str = "torch", *, tp: int = 2, pp: int = 1,
                     seed: int = 0, force: bool = False) -> Path:
    """Write a synthetic checkpoint of ``preset`` to ``out`` in format ``torch`` or ``torch_dist``."""
    p = PRESETS[preset] if isinstance(preset, str) else preset
    out = Path(out)
    if out.exists():
        if not force:
            raise FileExistsError(f"{out} exists (pass force=True / --force)")
        shutil.rmtree(out)
    if fmt == "torch":
        return write_legacy(p, out, tp=tp, pp=pp, seed=seed)
    if fmt == "torch_dist":
        if pp != 1:
            raise ValueError("torch_dist checkpoints are PP-agnostic on disk; pp is not used")
        return write_dist(p, out, tp=tp, seed=seed)
    raise ValueError(f"unknown format {fmt!r} (torch | torch_dist)")


def dir_bytes(path: str | Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            total += os.path.getsize(os.path.join(root, f))
    return total


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mexc.tools.synth_checkpoint", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), required=True)
    ap.add_argument("--format", choices=["torch", "torch_dist"], default="torch")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args(argv)
    t = time.perf_counter()
    write_checkpoint(a.preset, a.out, a.format, tp=a.tp, pp=a.pp, seed=a.seed, force=a.force)
    dt = time.perf_counter() - t
    n = dir_bytes(a.out)
    print(f"{a.out}: {a.preset} {a.format} tp={a.tp} pp={a.pp}: {n / 1e9:.2f} GB in {dt:.1f} s "
          f"({n / 1e9 / max(dt, 1e-9):.2f} GB/s); {PRESETS[a.preset].param_count(a.tp) / 1e9:.2f} B params "
          f"({json.dumps(asdict(PRESETS[a.preset]))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
