"""NeMo 2, NeMo 1 (.nemo) and Megatron-Bridge checkpoints around a REAL megatron-core torch_dist checkpoint.

The weights are those of a fixture of ``tests/megatron_fixtures.py`` (real megatron-core saves, with reference
logits): their ``.distcp`` files are copied byte for byte and the DCP index (``.metadata``) is rewritten with the
key prefix the wrapper's own writer adds (NeMo 2: ``module.``, NeMo 1: ``model.``; Megatron-Bridge: none).
The wrapper files around them follow the layouts documented in the NeMo and Megatron-Bridge sources
(tests/data/wrappers/README.md says which parts NeMo 2.7.3 itself wrote and why the rest is assembled):

* NeMo 2 ``context/``: written by NeMo 2.7.3 itself (tests/data/wrappers/nemo-2.7.3/<kind>, by
  tests/fixture_makers/nemo_context.py) for the kinds it has; otherwise, and for Megatron-Bridge's ``model:`` section,
  the config is a dump of the megatron-core ``TransformerConfig`` the fixture was built with, every
  dataclass field, serialized with the conventions of Megatron-Bridge's / NeMo's YAML representers
  (functions and dtypes as ``{_target_: module.name, _call_: false}``, enums with ``_name_``), plus the GPT
  config / provider fields (``seq_length``, ``share_embeddings_and_output_weights``, ``transformer_layer_spec``,
  ...);
* NeMo 1: ``model_config.yaml`` with NeMo 1 names; the ``.nemo`` is an uncompressed tar with ``./`` names, as
  NeMo's ``SaveRestoreConnector`` writes it.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import pickle
import shutil
import tarfile
from pathlib import Path

import torch
import yaml

from megatron_fixtures import load_fixture_info, megatron_checkpoint

REAL_NEMO_CONTEXT = Path(__file__).resolve().parent / "data" / "wrappers" / "nemo-2.7.3"  # by NeMo itself
REAL_BRIDGE_CONFIG = Path(__file__).resolve().parent / "data" / "wrappers" / "bridge-0.3.1"  # by Megatron-Bridge
BRIDGE_PROVIDER = "megatron.bridge.models.gpt_provider.GPTModelProvider"
NEMO_MODEL, NEMO_CONFIG = "nemo.collections.llm.gpt.model.base.GPTModel", "nemo.collections.llm.gpt.model.base.GPTConfig"


def prefixed_dcp(src: Path, dst: Path, prefix: str) -> None:
    """Copy the torch_dist directory ``src`` to ``dst`` with every tensor key renamed ``prefix + key``."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.suffix == ".distcp":
            shutil.copyfile(f, dst / f.name)
    with open(src / ".metadata", "rb") as f:
        meta = pickle.load(f)  # our own fixture (trusted)
    meta.state_dict_metadata = {prefix + k: v for k, v in meta.state_dict_metadata.items()}
    meta.storage_data = {dataclasses.replace(i, fqn=prefix + i.fqn): v for i, v in meta.storage_data.items()}
    with open(dst / ".metadata", "wb") as f:
        pickle.dump(meta, f)
    (dst / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                                                   "common_backend": "torch", "common_backend_version": 1}))


def _yaml_value(v):
    """Megatron-Bridge's / NeMo's YAML representers: callables and dtypes by reference, enums by name."""
    if isinstance(v, torch.dtype):
        return {"_target_": str(v), "_call_": False}
    if isinstance(v, enum.Enum):
        cls = type(v)
        return {"_target_": f"{cls.__module__}.{cls.__qualname__}", "_call_": True, "_args_": [v.value],
                "_name_": v.name}
    if callable(v) and hasattr(v, "__qualname__"):
        return {"_target_": f"{v.__module__}.{v.__qualname__}", "_call_": False}
    if isinstance(v, (list, tuple)):
        return [_yaml_value(x) for x in v]
    if isinstance(v, dict):
        return {k: _yaml_value(x) for k, x in v.items()}
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    cls = type(v)
    return {"_target_": f"{cls.__module__}.{cls.__qualname__}", "_call_": True}


def transformer_config_fields(d: Path) -> dict:
    """Every field of the megatron-core ``TransformerConfig`` fixture ``d`` was built with, YAML-ready, plus the GPT
    config / provider fields."""
    cfg, h, info = _transformer_config(d)
    out = {f.name: _yaml_value(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if not f.name.startswith("_")}
    out.update(_gpt_fields(h, info))
    return out


def _gpt_fields(h: dict, info: dict) -> dict:
    return dict(position_embedding_type=h["position_embedding_type"], rotary_base=h["rotary_base"],
                rotary_percent=h["rotary_percent"], seq_length=info["max_position_embeddings"],
                share_embeddings_and_output_weights=not h["untie_embeddings_and_output_weights"],
                make_vocab_size_divisible_by=128, vocab_size=info["vocab_size"], parallel_output=True,
                seq_len_interpolation_factor=None, fp16_lm_cross_entropy=False,
                scatter_embedding_sequence_parallel=True, tp_comm_overlap_cfg=None)


def bridge_model_config(d: Path) -> dict:
    """Megatron-Bridge's 2026 model-config form (``BridgeGPTModelConfig.as_dict``): GPT build fields outside, the
    ``TransformerConfig`` nested under ``transformer:`` with callables left out and ``activation_func`` by its
    short name (Bridge's ``activation_map``)."""
    cfg, h, info = _transformer_config(d)
    tc = {"_target_": "megatron.core.transformer.transformer_config.TransformerConfig"}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if not (callable(v) or f.name.startswith("_")):
            tc[f.name] = _yaml_value(v)
    tc["activation_func"] = {"silu": "silu", "gelu": "gelu", "squared_relu": "squared_relu"}[cfg.activation_func.__name__]
    return {"_target_": "megatron.bridge.models.gpt.model_config.BridgeGPTModelConfig",
            "_builder_": "megatron.bridge.models.gpt.gpt_builder.GPTModelBuilder", "transformer": tc,
            "transformer_layer_spec": None, "should_pad_vocab": False, "rope_scaling": False,
            "rope_scaling_factor": 8.0, "use_arbitrary_attention_mask": None, **_gpt_fields(h, info)}


def _transformer_config(d: Path):
    """The megatron-core ``TransformerConfig`` fixture ``d`` was built with, its hyper-parameters and fixture.json."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_mexc_fixture_maker", Path(__file__).resolve().parent.parent
                                                  / "tests" / "fixture_makers" / "megatron_core.py")
    maker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(maker)
    from megatron.core.transformer.transformer_config import TransformerConfig

    info = load_fixture_info(d)
    h = maker.kind_hparams(info["kind"])
    gated = h["swiglu"] if h["gated_linear_unit"] is None else h["gated_linear_unit"]
    moe = {} if h["num_experts"] is None else dict(  # as the fixture maker builds its MoE config
        num_moe_experts=h["num_experts"], moe_router_topk=h["moe_router_topk"],
        moe_ffn_hidden_size=h["moe_ffn_hidden_size"], moe_grouped_gemm=False, moe_router_dtype="fp32",
        moe_token_dispatcher_type="allgather", moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
        expert_tensor_parallel_size=info["tp"])
    return TransformerConfig(
        num_layers=h["num_layers"], hidden_size=h["hidden_size"], num_attention_heads=h["num_attention_heads"],
        num_query_groups=h["num_query_groups"], kv_channels=h["kv_channels"], ffn_hidden_size=h["ffn_hidden_size"],
        normalization=h["normalization"], layernorm_epsilon=h["norm_epsilon"],
        layernorm_zero_centered_gamma=h["zero_centered_gamma"], gated_linear_unit=gated,
        activation_func=maker._activation(h), add_bias_linear=h["add_bias_linear"], add_qkv_bias=h["add_qkv_bias"],
        hidden_dropout=0.0, attention_dropout=0.0, params_dtype=torch.float32, pipeline_dtype=torch.float32,
        tensor_model_parallel_size=info["tp"], pipeline_model_parallel_size=info["pp"], **moe), h, info


def _fresh(out: Path) -> Path:
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    return out


def nemo2_dir(kind: str, out: Path, tp: int = 1) -> tuple[Path, Path]:
    """A NeMo 2 checkpoint directory (context/ + weights/ with ``module.`` keys); returns (it, the megatron fixture
    dir). ``context/`` is the one NeMo 2.7.3 itself wrote for the kind (tests/fixture_makers/nemo_context.py) where
    tests/data/wrappers has it (llama, gpt, llama3 as ``Llama31Config``, moe as ``MixtralConfig``), else a dump of
    the fixture's TransformerConfig in NeMo's format."""
    d = megatron_checkpoint(kind, tp=tp, fmt="torch_dist")
    if (REAL_NEMO_CONTEXT / kind / "context" / "model.yaml").is_file():
        root = _fresh(out) / "megatron_gpt--val_loss=2.50-step=9-consumed_samples=20.0"
        prefixed_dcp(d / "ckpt" / "iter_0000010", root / "weights", "module.")
        torch.save({"global_step": 10, "epoch": 0}, root / "weights" / "common.pt")
        shutil.copytree(REAL_NEMO_CONTEXT / kind / "context", root / "context")
        return root, d
    fields = transformer_config_fields(d)
    model_cls, cfg_cls = NEMO_MODEL, NEMO_CONFIG
    if kind == "llama3":
        model_cls, cfg_cls = "nemo.collections.llm.gpt.model.llama.LlamaModel", \
            "nemo.collections.llm.gpt.model.llama.Llama31Config"
        fields.update(scale_factor=load_fixture_info(d)["hparams"]["rope_scaling_factor"], low_freq_factor=1.0,
                      high_freq_factor=4.0, old_context_len=8192)
    elif kind == "moe":
        model_cls, cfg_cls = "nemo.collections.llm.gpt.model.mixtral.MixtralModel", \
            "nemo.collections.llm.gpt.model.mixtral.MixtralConfig"
    root = _fresh(out) / "megatron_gpt--val_loss=2.50-step=9-consumed_samples=20.0"
    prefixed_dcp(d / "ckpt" / "iter_0000010", root / "weights", "module.")
    torch.save({"global_step": 10, "epoch": 0, "pytorch-lightning_version": "2.5.1"}, root / "weights" / "common.pt")
    config = {"_target_": cfg_cls, **fields,
              "transformer_layer_spec": {"_target_": "nemo.collections.llm.gpt.model.base.default_layer_spec",
                                         "_call_": False},
              "forward_step_fn": {"_target_": "nemo.collections.llm.gpt.model.base.gpt_forward_step", "_call_": False},
              "data_step_fn": {"_target_": "nemo.collections.llm.gpt.model.base.gpt_data_step", "_call_": False}}
    model = {"_target_": model_cls, "config": config, "model_transform": None,
             "optim": {"_target_": "nemo.lightning.pytorch.optim.megatron.MegatronOptimizerModule",
                       "config": {"_target_": "megatron.core.optimizer.optimizer_config.OptimizerConfig", "lr": 3e-4}},
             "tokenizer": {"_target_": "nemo.collections.common.tokenizers.huggingface.auto_tokenizer.AutoTokenizer",
                           "pretrained_model_name": "gpt2"}}
    (root / "context").mkdir()
    (root / "context" / "model.yaml").write_text(yaml.safe_dump(model))
    return root, d


def nemo1_config(d: Path) -> dict:
    """A NeMo 1 ``model_config.yaml`` (megatron_gpt_config.yaml names) for fixture ``d``."""
    info = load_fixture_info(d)
    h = info["hparams"]
    act = {"silu": "swiglu", "gelu": "geglu" if h["gated_linear_unit"] else "gelu",
           "squared-relu": "squared-relu"}[h["activation"]]
    norm = {"RMSNorm": "rmsnorm", "LayerNorm": "layernorm1p" if h["zero_centered_gamma"] else "layernorm"}
    return {"mcore_gpt": True, "precision": 32, "micro_batch_size": 1, "global_batch_size": 2,
            "tensor_model_parallel_size": info["tp"], "pipeline_model_parallel_size": info["pp"],
            "encoder_seq_length": info["max_position_embeddings"],
            "max_position_embeddings": "${.encoder_seq_length}",  # as NeMo's megatron_gpt_config.yaml has it
            "num_layers": h["num_layers"],
            "hidden_size": h["hidden_size"], "ffn_hidden_size": h["ffn_hidden_size"],
            "num_attention_heads": h["num_attention_heads"], "num_query_groups": h["num_query_groups"],
            "kv_channels": h["kv_channels"], "init_method_std": 0.02, "use_scaled_init_method": True,
            "hidden_dropout": 0.0, "attention_dropout": 0.0, "ffn_dropout": 0.0, "kv_channels_unused": None,
            "apply_query_key_layer_scaling": False, "normalization": norm[h["normalization"]],
            "layernorm_epsilon": f"{h['norm_epsilon']:g}",  # `1e-05` unquoted: YAML 1.1 reads it as a string
            "do_layer_norm_weight_decay": False,
            "make_vocab_size_divisible_by": 128, "pre_process": True, "post_process": True, "persist_layer_norm": True,
            "bias": h["add_bias_linear"], "qkv_bias": h["add_qkv_bias"], "activation": act, "headscale": False,
            "transformer_block_type": "pre_ln", "openai_gelu": h["openai_gelu"], "normalize_attention_scores": True,
            "position_embedding_type": h["position_embedding_type"], "rotary_percentage": h["rotary_percent"],
            "rotary_base": h["rotary_base"], "share_embeddings_and_output_weights":
                not h["untie_embeddings_and_output_weights"], "megatron_amp_O2": False,
            "dist_ckpt_format": "torch_dist",
            "tokenizer": {"library": "megatron", "type": "GPT2BPETokenizer", "model": None},
            "optim": {"name": "fused_adam", "lr": 2e-4}, "data": {"data_prefix": [], "seq_length": 32}}


def nemo1_archive(kind: str, out: Path, tp: int = 1, config: dict | None = None,
                  inner: str = "nemo1") -> tuple[Path, Path]:
    """A NeMo 1 ``.nemo`` (uncompressed tar, ``./`` names: model_config.yaml + model_weights/ with ``model.`` keys);
    ``inner="nemo2"`` packs a NeMo 2 directory instead. Returns (the .nemo, the megatron fixture dir)."""
    stage = _fresh(out.with_suffix(".stage"))
    if inner == "nemo2":
        src, d = nemo2_dir(kind, stage, tp)
    else:
        d = megatron_checkpoint(kind, tp=tp, fmt="torch_dist")
        src = stage / "unpacked"
        prefixed_dcp(d / "ckpt" / "iter_0000010", src / "model_weights", "model.")
        torch.save({"content_metadata": {}}, src / "model_weights" / "common.pt")
        (src / "model_config.yaml").write_text(yaml.safe_dump(config or nemo1_config(d)))
    with tarfile.open(_fresh(out), "w:") as tar:
        tar.add(src, arcname=".")
    shutil.rmtree(stage)
    return out, d


def bridge_save(kind: str, out: Path, tp: int = 1, form: str = "provider") -> tuple[Path, Path]:
    """A Megatron-Bridge save dir: trackers, iter_0000010/ (torch_dist, keys as Megatron-LM's, common.pt without
    ``args``, run_config.yaml, train_state.pt). ``form``: ``provider``: the run_config.yaml Megatron-Bridge 0.3.1
    itself wrote for the kind (tests/fixture_makers/bridge_run_config.py) where tests/data/wrappers has one (llama, gpt),
    else a GPT provider dump of the fixture's TransformerConfig; ``model-config``: the nested 2026 model-config form.
    Returns (the save dir, the megatron fixture dir)."""
    d = megatron_checkpoint(kind, tp=tp, fmt="torch_dist")
    root = _fresh(out)
    it = root / "iter_0000010"
    prefixed_dcp(d / "ckpt" / "iter_0000010", it, "")
    torch.save({"checkpoint_version": 3.0, "iteration": 10}, it / "common.pt")
    state = {"step": torch.tensor(10), "consumed_train_samples": torch.tensor(20), "floating_point_operations_so_far":
             torch.tensor(0.0)}
    torch.save(state, it / "train_state.pt")
    torch.save(state, root / "latest_train_state.pt")
    (root / "latest_checkpointed_iteration.txt").write_text("10")
    if form == "model-config":
        model = bridge_model_config(d)
    else:
        model = {"_target_": BRIDGE_PROVIDER, **transformer_config_fields(d),
                 "transformer_layer_spec": {"_target_": "megatron.bridge.models.gpt_provider.default_layer_spec",
                                            "_call_": False},
                 "rope_scaling": False, "rope_scaling_factor": 1.0, "should_pad_vocab": False, "hf_model_id": None}
    run_config = {"_target_": "megatron.bridge.training.config.ConfigContainer", "model": model,
                  "checkpoint": {"_target_": "megatron.bridge.training.config.CheckpointConfig",
                                 "ckpt_format": "torch_dist", "save": str(root), "save_interval": 10},
                  "train": {"_target_": "megatron.bridge.training.config.TrainingConfig", "train_iters": 10,
                            "global_batch_size": 2, "micro_batch_size": 1},
                  "tokenizer": {"_target_": "megatron.bridge.training.tokenizers.config.TokenizerConfig",
                                "tokenizer_type": "NullTokenizer", "vocab_size": 100}}
    real = REAL_BRIDGE_CONFIG / kind / "run_config.yaml"
    if form == "provider" and real.is_file():
        shutil.copyfile(real, it / "run_config.yaml")
    else:
        (it / "run_config.yaml").write_text(yaml.safe_dump(run_config))
    return root, d
