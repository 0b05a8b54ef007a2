"""GPU oracle for issue 18: megatron-core's own ``MambaModel`` forward on a Nemotron-H-shaped checkpoint, compared
with transformers' ``NemotronHForCausalLM`` (the CPU test oracle) and with mexc's ``--target hf`` output.

megatron-core's Mamba mixer needs mamba-ssm's Triton kernels (``mamba_chunk_scan_combined``, the gated
``RMSNorm``), so this runs only on a CUDA machine, never in CI. Set-up there (no network): the megatron-core
0.16.1 wheel and the mamba-ssm source tree (its Python/Triton part; the CUDA extensions are only used by Mamba-1
and by the fused ``use_mamba_mem_eff_path``, which this leaves off) on ``PYTHONPATH``.

megatron-core's stock ``mamba_stack_spec`` uses Transformer Engine modules (fused norm + linear); TE does not
install there, so the model is built from a stack spec with megatron-core's local modules (``ColumnParallelLinear``
/ ``RowParallelLinear`` / ``DotProductAttention`` and a separate ``WrappedTorchNorm``): the same math; the fused
norm weights (``mixer.in_proj.layer_norm_weight`` ...) load into the separate norms (``norm.weight`` ...), and
``MambaStack``'s final norm, hard-wired to ``TENorm`` in ssm/mamba_block.py, is built as ``WrappedTorchNorm``.

    python tools/gpu_oracles/nemotron_h_megatron_core.py reference --work W        # without mamba-ssm on the path
    python tools/gpu_oracles/nemotron_h_megatron_core.py megatron --work W --out O  # with megatron-core, mamba-ssm

Prints the max-abs logit differences and writes ``OUT_DIR/nemotron_h_megatron_core.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))


def local_stack_spec():
    """megatron-core's ``mamba_stack_spec`` (models/mamba/mamba_layer_specs.py) with local modules for TE's."""
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.ssm.mamba_block import MambaStack, MambaStackSubmodules
    from megatron.core.ssm.mamba_layer import MambaLayer, MambaLayerSubmodules
    from megatron.core.ssm.mamba_mixer import MambaMixer, MambaMixerSubmodules
    from megatron.core.ssm.mlp_layer import MLPLayer
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

    return ModuleSpec(module=MambaStack, submodules=MambaStackSubmodules(
        mamba_layer=ModuleSpec(module=MambaLayer, submodules=MambaLayerSubmodules(
            norm=WrappedTorchNorm,
            mixer=ModuleSpec(module=MambaMixer, submodules=MambaMixerSubmodules(
                in_proj=ColumnParallelLinear, out_proj=RowParallelLinear)),
            mamba_bda=get_bias_dropout_add)),
        attention_layer=ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
            input_layernorm=WrappedTorchNorm,
            self_attention=ModuleSpec(module=SelfAttention, params={"attn_mask_type": AttnMaskType.causal},
                                      submodules=SelfAttentionSubmodules(
                                          linear_qkv=ColumnParallelLinear, core_attention=DotProductAttention,
                                          linear_proj=RowParallelLinear)),
            self_attn_bda=get_bias_dropout_add)),
        mlp_layer=ModuleSpec(module=MLPLayer, submodules=TransformerLayerSubmodules(
            pre_mlp_layernorm=WrappedTorchNorm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(
                linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)),
            mlp_bda=get_bias_dropout_add))))


_FUSED_NORMS = {"mixer.in_proj.layer_norm_weight": "norm.weight",
                "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
                "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight"}


def to_local_keys(state: dict) -> dict:
    """TE-spec keys (as Megatron saves them, fused norms) -> the local spec's keys."""
    out = {}
    for k, v in state.items():
        for fused, local in _FUSED_NORMS.items():
            if k.endswith(fused):
                k = k[: -len(fused)] + local
        out[k] = v
    return out


def megatron_model(args):
    """A ``MambaModel`` configured from the args the checkpoint holds (the names ``pretrain_mamba.py`` reads)."""
    import torch.nn.functional as F
    from megatron.core.models.mamba.mamba_model import MambaModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = TransformerConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size, ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads, num_query_groups=args.num_query_groups,
        kv_channels=args.kv_channels, normalization=args.normalization, layernorm_epsilon=args.layernorm_epsilon,
        activation_func=lambda x: torch.pow(F.relu(x), 2), gated_linear_unit=False, add_bias_linear=False,
        add_qkv_bias=False, mamba_state_dim=args.mamba_state_dim, mamba_head_dim=args.mamba_head_dim,
        mamba_num_groups=args.mamba_num_groups, mamba_num_heads=args.mamba_num_heads,
        use_mamba_mem_eff_path=False, hidden_dropout=0.0, attention_dropout=0.0, params_dtype=torch.float32,
        bf16=False, fp16=False, tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    import megatron.core.ssm.mamba_block as mamba_block
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    mamba_block.TENorm = WrappedTorchNorm   # MambaStack builds its final norm as TENorm whatever the spec says
    return MambaModel(cfg, local_stack_spec(), vocab_size=args.padded_vocab_size,
                      max_sequence_length=args.max_position_embeddings,
                      hybrid_override_pattern=args.hybrid_override_pattern, position_embedding_type="none",
                      share_embeddings_and_output_weights=False)


def reference_phase(work: Path) -> dict:
    """CPU, without mamba-ssm importable (transformers would take its Triton kernels): the random
    ``NemotronHForCausalLM``, its Megatron checkpoint, its logits and those of mexc's hf output."""
    import nemotron_h_writer as writer
    from transformers import AutoModelForCausalLM

    from mexc.backends.base import CompileOptions
    from mexc.driver import compile_checkpoint

    ref = writer.reference(seed=0)
    tokens = torch.randint(0, ref.config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(1))
    ckpt = writer.write_legacy(ref, work / "ckpt", tp=1)
    compile_checkpoint(ckpt, work / "hf", CompileOptions(target="hf"))
    hf = AutoModelForCausalLM.from_pretrained(work / "hf", dtype=torch.float32).eval()   # as served
    with torch.no_grad():
        torch.save({"tokens": tokens, "transformers": writer.logits(ref, tokens), "mexc_hf": hf(tokens).logits},
                   work / "logits.pt")
    return {"pattern": writer.PATTERN, "tokens": list(tokens.shape)}


def megatron_phase(work: Path, device: str, ieee: bool) -> dict:
    """megatron-core's forward of the checkpoint the reference phase wrote, against both sets of logits.
    ``ieee``: fp32 products in full precision (cuDNN's conv, cuBLAS and Triton's ``tl.dot`` otherwise use TF32)."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("gloo", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    if device == "cuda":
        model_parallel_cuda_manual_seed(0)
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = not ieee
        os.environ["TRITON_F32_DEFAULT"] = "ieee" if ieee else "tf32"   # tl.dot in mamba-ssm's SSD kernels
    saved = torch.load(work / "ckpt" / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt", weights_only=False)
    model = megatron_model(saved["args"])
    missing, unexpected = model.load_state_dict(to_local_keys(saved["model"]), strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise SystemExit(f"state dict does not fit the local spec: missing {missing}, unexpected {unexpected}")
    ref = torch.load(work / "logits.pt")
    model = model.to(device).eval()
    with torch.no_grad():
        got = model(ref["tokens"].to(device), position_ids=None, attention_mask=None).float().cpu()
    return {"megatron_core_vs_transformers": (got - ref["transformers"]).abs().max().item(),
            "mexc_hf_vs_megatron_core": (ref["mexc_hf"] - got).abs().max().item(),
            "mexc_hf_vs_transformers": (ref["mexc_hf"] - ref["transformers"]).abs().max().item(),
            "logit_scale": ref["transformers"].abs().max().item(), "device": device, "fp32_products": "ieee"
            if ieee else "tf32",
            "torch": torch.__version__}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("phase", choices=("reference", "megatron"))
    ap.add_argument("--work", type=Path, required=True, help="shared by both phases")
    ap.add_argument("--out", type=Path, help="megatron phase: where the JSON figures go")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tf32", action="store_true", help="let cuDNN/cuBLAS/Triton use TF32 (their defaults)")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    if a.phase == "reference":
        (a.work / "reference.json").write_text(json.dumps(reference_phase(a.work)))
        return 0
    results = {**json.loads((a.work / "reference.json").read_text()), **megatron_phase(a.work, a.device, not a.tf32)}
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / f"nemotron_h_megatron_core{'_tf32' if a.tf32 else ''}.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
