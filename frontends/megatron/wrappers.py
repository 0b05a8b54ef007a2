"""Megatron checkpoints inside NeMo and Megatron-Bridge layouts: where the torch_dist checkpoint is, and the
architecture from the wrapper's saved config, as Megatron-LM argument names.

Layouts read (from NeMo's and Megatron-Bridge's own save code; docs/checkpoint-formats.md):

* **NeMo 2** directory: ``context/model.yaml`` (the model, ``_target_`` class paths, its ``config:`` section with
  megatron-core ``TransformerConfig`` field names, functions as ``{_target_: torch.nn.functional.silu, _call_:
  false}``) and ``weights/``: a megatron-core torch_dist checkpoint whose keys carry ``module.`` (NeMo's
  ``MegatronParallel`` adds it).
* **NeMo 1** (``.nemo`` archive or its unpacked directory): ``model_config.yaml`` (NeMo 1 names: ``activation:
  swiglu``, ``normalization: rmsnorm``, ``bias``, ``rotary_percentage``, ...) and ``model_weights/``, a torch_dist
  checkpoint with ``model.``-prefixed keys (``mcore_gpt: true`` models).
* **``.nemo`` archives** (an uncompressed tar of either of the above) are read in place: every member is
  validated (plain files and directories only, relative names without ``..``, data within the archive) and a
  weight is read from its byte range in the tar; nothing is extracted.
* **Megatron-Bridge**: a Megatron ``iter_NNNNNNN`` torch_dist directory with ``run_config.yaml`` beside its
  files (the ``ConfigContainer``; its ``model:`` section is the provider: ``TransformerConfig`` names), no
  Megatron-LM ``args``; keys as Megatron-LM's.

The config is translated into a Megatron-LM ``argparse.Namespace`` (:data:`RENAMED`, :func:`_activation`, ...) that
the argument table (:mod:`.arguments`) then judges like saved args. A field that changes the math and has no
translation is refused with one line naming the config file (never dropped); fields the table does not know are
listed as ``unknown_args`` in the lifted model, as for Megatron-LM args. Config files are parsed with
``yaml.safe_load``: no ``_target_`` is ever imported or called.
"""

from __future__ import annotations

import argparse
import re
import tarfile
from pathlib import Path
from typing import Any

from ...errors import CheckpointError, ConfigError
from . import arguments
from .nemo_archive import TarDcpStore, TarTree
from .reader import CheckpointInfo, DcpStore, locate
from .wrapper_files import (MAX_CONFIG_BYTES, DirTree, bridge_tokenizer, check_backend, load_yaml, nemo2_tokenizer,
                            plain, read_file, ref)

_EMBEDDING = "embedding.word_embeddings.weight"


# ------------------------------------------------------------------------------------------ entry


def open_wrapped(path: Path, iteration: int | None = None) -> CheckpointInfo | None:
    """The :class:`CheckpointInfo` of a NeMo / Megatron-Bridge checkpoint at ``path`` (its ``store`` set: key
    prefix stripped, tar members read in place), or None when ``path`` is none of these layouts.

    Raises :class:`CheckpointError` / :class:`ConfigError` (one line naming the file) for a damaged or hostile
    archive, a config that is not YAML, or a setting that changes the math and has no translation."""
    if path.is_file() and (path.suffix == ".nemo" or tarfile.is_tarfile(path)):
        return _open_tree(TarTree(path), path, iteration)
    if not path.is_dir():
        return None
    if path.name in ("weights", "model_weights", "context") and ((path.parent / "context").is_dir() or
                                                                 (path.parent / "model_config.yaml").is_file()):
        path = path.parent  # the weights (or context) directory of a NeMo checkpoint: the checkpoint is one level up
    if (path / "context").is_dir() and (path / "weights").is_dir() or (path / "model_config.yaml").is_file():
        return _open_tree(DirTree(path), path, iteration)
    if (path / "run_config.yaml").is_file() or any(
            (p / "run_config.yaml").is_file() for p in path.iterdir() if p.is_dir() and p.name.startswith("iter_")):
        root, d, it = locate(path, iteration)
        if (d / "run_config.yaml").is_file():
            return _open_bridge(root, d, it)
    _refuse_trainer_folder(path)
    return None


_STEP = re.compile(r"step=(\d+)")


def _refuse_trainer_folder(path: Path) -> None:
    """A NeMo trainer's folder (its ``checkpoints/``, or the run directory above it) holds one checkpoint per
    saved step, named ``<name>--step=N-consumed_samples=M[-last]`` by NeMo's ``ModelCheckpoint``
    (nemo/lightning/pytorch/callbacks/model_checkpoint.py), or ``.nemo`` files: say so and name the latest,
    rather than "no Megatron checkpoint here"."""
    for folder in (path, path / "checkpoints"):
        if not folder.is_dir():
            continue
        found = [p for p in folder.iterdir() if (p.is_dir() and (p / "context").is_dir() and (p / "weights").is_dir())
                 or (p.suffix == ".nemo" and p.is_file())]
        if not found:
            continue

        def key(p: Path) -> tuple[int, bool, str]:
            m = _STEP.search(p.name)
            return (int(m.group(1)) if m else -1, p.name.endswith("-last"), p.name)

        found.sort(key=key)
        steps = list(dict.fromkeys(str(key(p)[0]) for p in found if key(p)[0] >= 0))
        what = (f"step{'s' if len(steps) > 1 else ''} {', '.join(steps)}" if steps
                else ", ".join(p.name for p in found[:3]) + (", ..." if len(found) > 3 else ""))
        n = f"{len(found)} NeMo checkpoint{'s' if len(found) > 1 else ''} ({what})"
        where = "a NeMo trainer's checkpoint folder" if folder == path else "a NeMo run directory: its checkpoints/"
        raise CheckpointError(f"{path}: {where} holds {n}; mexc reads one checkpoint",
                              hint=f"give one of them, e.g. the latest: {found[-1]}")


def _open_tree(tree, root: Path, iteration: int | None) -> CheckpointInfo:
    if tree.is_file("context/model.yaml") and tree.is_dir("weights"):
        cfg_name, weights, prefix = "context/model.yaml", "weights", "module."
    elif tree.is_file("model_config.yaml") and tree.is_dir("model_weights"):
        cfg_name, weights, prefix = "model_config.yaml", "model_weights", "model."
    elif tree.is_dir("context") and tree.is_dir("weights"):
        raise CheckpointError(f"{tree.label('context')}: a NeMo 2 checkpoint without context/model.yaml (only "
                              "io.json, which is a fiddle graph mexc does not evaluate)",
                              hint="load it in NeMo and save it again (NeMo's ModelCheckpoint writes "
                                   "context/model.yaml), or export it with NeMo's Hugging Face exporter")
    else:
        raise CheckpointError(f"{tree.label('')}: a NeMo checkpoint without model_weights/ or weights/",
                              hint="NeMo 1 checkpoints whose weights are model_weights.ckpt files (no mcore "
                                   "torch_dist) are not read; re-save it with mcore_gpt=True and dist checkpoints")
    where = tree.label(cfg_name)
    cfg = load_yaml(tree.read(cfg_name, MAX_CONFIG_BYTES), where)
    if iteration is not None:
        raise CheckpointError(f"{tree.label('')}: a NeMo checkpoint holds one step; --iteration does not apply",
                              hint="drop --iteration")
    if not tree.is_file(f"{weights}/.metadata") or not tree.is_file(f"{weights}/metadata.json"):
        raise CheckpointError(f"{tree.label(weights)}: no torch_dist checkpoint (metadata.json, .metadata)",
                              hint="only megatron-core dist checkpoints (torch_dist) are read; zarr and "
                                   "model_weights.ckpt files are not")
    check_backend(tree.read(f"{weights}/metadata.json", 1 << 16), tree.label(f"{weights}/metadata.json"))
    if isinstance(tree, TarTree):
        store: DcpStore = TarDcpStore("ckpt", str(tree.path.resolve()), weights, prefix)
    else:
        store = DcpStore("ckpt", str((root / weights).resolve()), prefix)
    if prefix == "module.":
        args = nemo2_args(cfg, where, store)
        if isinstance(tree, DirTree):
            vars(args).update(nemo2_tokenizer(cfg.get("tokenizer"), root / "context"))
        m = re.search(r"step=(\d+)", root.name)
        it = int(m.group(1)) if m else None
    else:
        args = nemo1_args(cfg, where, store)
        it = None
    info = CheckpointInfo(root, root / weights, "torch_dist", it, args, None)
    info.store = store
    return info


def _open_bridge(root: Path, d: Path, it: int | None) -> CheckpointInfo:
    where = str(d / "run_config.yaml")
    cfg = load_yaml(read_file(d / "run_config.yaml", MAX_CONFIG_BYTES), where)
    model = cfg.get("model") if isinstance(cfg, dict) else None
    if not isinstance(model, dict):
        raise ConfigError(f"{where}: no model: section (a Megatron-Bridge ConfigContainer has one)",
                          hint="copy the run's run_config.yaml again")
    ckpt = cfg.get("checkpoint") if isinstance(cfg.get("checkpoint"), dict) else {}
    if ckpt.get("ckpt_format", "torch_dist") != "torch_dist":
        raise CheckpointError(f"{where}: checkpoint.ckpt_format {ckpt.get('ckpt_format')!r}; mexc reads torch_dist",
                              hint="re-save it with checkpoint.ckpt_format=torch_dist")
    if not (d / ".metadata").is_file():
        raise CheckpointError(f"{d}: run_config.yaml but no torch_dist files (.metadata)",
                              hint="copy the whole iteration directory")
    store = DcpStore("ckpt", str(d.resolve()))
    if isinstance(model.get("transformer"), dict):
        # Megatron-Bridge's model-config form (BridgeGPTModelConfig, 2026): GPT build fields outside, the
        # TransformerConfig nested under transformer:, activation_func by short name ("silu")
        inner = model["transformer"]
        if inner.get("_target_") != _TRANSFORMER_CONFIG:
            raise ConfigError(f"{where}: model.transformer is a {inner.get('_target_')}, not megatron-core's "
                              "TransformerConfig", hint="mexc reads GPT models (no MLA / hybrid configs)")
        model = {**{k: v for k, v in inner.items() if k != "_target_"},
                 **{k: v for k, v in model.items() if k != "transformer"}}
    args = transformer_config_args(model, where, store, _BRIDGE_CLASSES)
    vars(args).update(bridge_tokenizer(cfg.get("tokenizer"), d / "tokenizer"))
    info = CheckpointInfo(root, d, "torch_dist", it, args, None)
    info.store = store
    return info


# ------------------------------------------------------------------------------------------ translation


# TransformerConfig / provider name -> Megatron-LM argument name (where they differ; the rest are the same)
RENAMED = {
    "num_layers_in_first_pipeline_stage": "decoder_first_pipeline_num_layers",
    "num_layers_in_last_pipeline_stage": "decoder_last_pipeline_num_layers",
    "seq_len_interpolation_factor": "rotary_seq_len_interpolation_factor",
    "rope_scaling": "use_rope_scaling",
    "num_moe_experts": "num_experts",
}
# fields that cannot change what the saved weights compute (callables, fusions, training-loop plumbing, logging)
IRRELEVANT = frozenset("""
    timers finalize_model_grads_func grad_scale_func no_sync_func grad_sync_func param_sync_func enable_autocast
    autocast_dtype pipeline_dtype num_microbatches_with_partial_activation_checkpoints _cpu_offloading_context
    activation_func_fp8_input_store output_layer_init_method init_method bias_activation_fusion
    bias_dropout_add_fusion fused_single_qkv_rope tp_only_amax_red moe_token_dropping
    disable_parameter_transpose_cache use_inference_optimized_layers logit_dtype parallel_output
    scatter_embedding_sequence_parallel tp_comm_overlap_cfg use_transformer_engine_full_layer_spec
    use_transformer_engine_op_fuser dense_grouped_gemm hf_model_id hf_model_revision should_pad_vocab
    make_vocab_size_divisible_by init_model_with_meta_device use_te_rng_tracker
    masked_softmax_fusion cross_entropy_loss_fusion cross_entropy_fusion_impl gradient_accumulation_fusion
    restore_modelopt_state use_arbitrary_attention_mask forward_step_fn data_step_fn generation_config
    deallocate_pipeline_outputs mtp_enabled _pg_collection bf16 fp16 params_dtype
""".split())
# TransformerConfig fields the argument table has no row for that change the math when set: the value that is fine
TC_REFUSED = {"heterogeneous_block_specs": False, "hetereogenous_dist_checkpoint": False,
              "moe_router_topk_limited_devices": None}
# layer specs that build the standard GPT layer (TE or local modules: the same math); any other is refused
STANDARD_SPECS = frozenset({
    "megatron.bridge.models.gpt_provider.default_layer_spec",
    "megatron.bridge.models.gpt_provider.transformer_engine_layer_spec",
    "megatron.bridge.models.gpt_provider.local_layer_spec",
    "nemo.collections.llm.gpt.model.base.default_layer_spec",
    "nemo.collections.llm.gpt.model.base.transformer_engine_layer_spec",
    "nemo.collections.llm.gpt.model.base.local_layer_spec",
})
# config / provider classes whose math is their TransformerConfig fields alone (no model code of their own);
# (Llama 3.1 / 3.2: their rope-scaling fields, translated); others (Gemma's embedding scaling, multimodal
# models, ...) are refused
_NEMO2_CLASSES = re.compile(r"nemo\.collections\.llm\.gpt\.model\.(base\.GPTConfig\w*|llama\.(Llama2?Config\w*|"
                            r"Llama3[12]?Config\w*|CodeLlamaConfig\w*)|mistral\.MistralConfig\w*|mixtral\.MixtralConfig"
                            r"\w*|qwen2\.Qwen2Config\w*|starcoder2\.Starcoder2Config\w*)$")
_NEMO2_MODELS = re.compile(r"nemo\.collections\.llm\.gpt\.model\.(base\.GPTModel|llama\.LlamaModel|mistral\."
                           r"MistralModel|mixtral\.MixtralModel|qwen2\.Qwen2Model|starcoder2\.Starcoder2Model)$")
_BRIDGE_CLASSES = re.compile(r"megatron\.bridge\.models\.(gpt_provider\.GPTModelProvider\w*|llama\.llama_provider\."
                             r"Llama\w*Provider\w*|qwen\.qwen_provider\.Qwen[23]\w*Provider\w*|mistral\.\w+\."
                             r"Mistral\w*Provider\w*|gpt\.model_config\.BridgeGPTModelConfig)$"
                             r"|megatron\.training\.models\.gpt\.GPTModelConfig$")
_TRANSFORMER_CONFIG = "megatron.core.transformer.transformer_config.TransformerConfig"
# activation_func target (last dotted name) -> (Megatron-LM switches when gated, when not gated)
_ACTIVATIONS = {
    "silu": ({"swiglu": True}, None),
    "gelu": ({"gated_linear_unit": True}, {}),
    "erf_gelu": ({"gated_linear_unit": True}, {}),
    "openai_gelu": ({"gated_linear_unit": True, "openai_gelu": True}, {"openai_gelu": True}),
    "fast_gelu": ({"gated_linear_unit": True, "openai_gelu": True}, {"openai_gelu": True}),
    "gelu_pytorch_tanh": ({"gated_linear_unit": True, "openai_gelu": True}, {"openai_gelu": True}),
    "squared_relu": (None, {"squared_relu": True}),
    "relu2": (None, {"squared_relu": True}),
}


def transformer_config_args(cfg: dict, where: str, store: DcpStore, classes: re.Pattern) -> argparse.Namespace:
    """Megatron-LM args from a saved ``TransformerConfig`` / GPT provider (``cfg``: its fields, ``_target_`` the
    class). The padded vocab and the parameter dtype come from the saved word embedding."""
    cfg = plain(cfg)
    target = str(cfg.get("_target_", ""))
    if not classes.match(target):
        raise ConfigError(f"{where}: model class {target or '(none)'} is not one whose math mexc knows from its "
                          "fields alone", hint="mexc reads the GPT, Llama (2, 3, 3.1, 3.2), Mistral, Mixtral, Qwen and "
                          "StarCoder2 configs; export others with NeMo's / Megatron-Bridge's own exporter")
    ns: dict[str, Any] = {}
    problems: list[str] = []
    for name, raw in cfg.items():
        v = ref(raw)
        if name.startswith("_") or name in IRRELEVANT or name in ("activation_func", "gated_linear_unit") or (
                name in ("scale_factor", "low_freq_factor", "high_freq_factor", "old_context_len")
                and re.search(r"\.Llama3[12]Config", target)):
            continue
        if name == "share_embeddings_and_output_weights":
            ns["untie_embeddings_and_output_weights"] = not v
        elif name == "transformer_layer_spec":
            # None: the builder's default GPT spec (the model-config form leaves callables out of the file)
            if v is not None and not (isinstance(v, str) and v in STANDARD_SPECS):
                problems.append(f"transformer_layer_spec={str(v)[:80]} (a custom layer spec can change any part "
                                "of the layer; mexc lifts the standard GPT specs)")
        elif name == "seq_length":
            ns["max_position_embeddings"] = v
        elif name in TC_REFUSED:
            if v not in (TC_REFUSED[name], None, False):
                problems.append(f"{name}={str(v)[:60]} (not lifted: per-layer or device-limited variants)")
        elif isinstance(v, (dict, list)) and v and arguments.lookup(RENAMED.get(name, name)) is None:
            problems.append(f"{name}={str(v)[:60]} (a structured value mexc cannot translate)")
        else:
            ns[RENAMED.get(name, name)] = v
    ns.update(_activation(cfg, where))
    if re.search(r"\.Llama3[12]Config", target):
        ns.update(_nemo_llama31_rope(cfg, where))
    if ns.get("num_query_groups") and ns.get("num_attention_heads") and \
            ns["num_query_groups"] != ns["num_attention_heads"]:
        ns["group_query_attention"] = True
    if not ns.get("use_rope_scaling"):
        ns.pop("rope_scaling_factor", None)   # only read with rope scaling on (Bridge stores 1.0 when off)
    return _finish(ns, problems, where, store)


def _nemo_llama31_rope(cfg: dict, where: str) -> dict:
    """NeMo 2's Llama 3.1 / 3.2 configs scale rope in model code with their own fields (``scale_factor``,
    ``low_freq_factor``, ``high_freq_factor``, ``old_context_len``): megatron-core's llama3 scaling, whose
    frequency bounds mexc takes as 1, 4 and 8192 (``ir.types.Rope``); other bounds are refused."""
    defaults = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "old_context_len": 8192}  # the dataclass's
    bounds = {k: cfg.get(k, d) for k, d in defaults.items()}
    if bounds != defaults:
        raise ConfigError(f"{where}: Llama 3.1 rope scaling with {bounds} (mexc lifts low 1, high 4, old context "
                          "8192)", hint="export it with NeMo's own Hugging Face exporter")
    return {"use_rope_scaling": True, "rope_scaling_factor": float(cfg.get("scale_factor", 8.0))}


def _activation(cfg: dict, where: str) -> dict:
    act = ref(cfg.get("activation_func", "torch.nn.functional.gelu"))
    gated = bool(cfg.get("gated_linear_unit", False))
    name = str(act).rsplit(".", 1)[-1]
    flags = _ACTIVATIONS.get(name, (None, None))[0 if gated else 1]
    if flags is None:
        raise ConfigError(f"{where}: activation_func {act} with gated_linear_unit={gated} has no Megatron-LM "
                          "form mexc lifts", hint="mexc lifts GELU (erf/tanh), SwiGLU, GeGLU and squared-ReLU MLPs")
    return flags


def nemo2_args(cfg: Any, where: str, store: DcpStore) -> argparse.Namespace:
    """Megatron-LM args from NeMo 2's ``context/model.yaml`` (the model class + its ``config:``)."""
    if not isinstance(cfg, dict) or not isinstance(cfg.get("config"), dict):
        raise ConfigError(f"{where}: no config: section (NeMo 2's model.yaml has one)",
                          hint="copy the checkpoint's context/ directory again")
    model = str(cfg.get("_target_", ""))
    if not _NEMO2_MODELS.match(model):
        raise ConfigError(f"{where}: model class {model or '(none)'} is not a GPT model mexc reads",
                          hint="mexc reads NeMo 2's GPT, Llama, Mistral, Mixtral, Qwen2 and StarCoder2 models")
    return transformer_config_args(cfg["config"], where, store, _NEMO2_CLASSES)


# NeMo 1 model_config.yaml name -> Megatron-LM name (NeMo's MegatronGPTModel / build_transformer_config)
_NEMO1_RENAMED = {"bias": "add_bias_linear", "qkv_bias": "add_qkv_bias", "rotary_percentage": "rotary_percent",
                  "seq_len_interpolation_factor": "rotary_seq_len_interpolation_factor",
                  "num_moe_experts": "num_experts"}
_NEMO1_COPIED = frozenset("""num_layers hidden_size ffn_hidden_size num_attention_heads kv_channels num_query_groups
    layernorm_epsilon max_position_embeddings position_embedding_type rotary_base rotary_interleaved openai_gelu
    qk_layernorm moe_router_topk window_size apply_residual_connection_post_layernorm
    tensor_model_parallel_size pipeline_model_parallel_size expert_model_parallel_size
    virtual_pipeline_model_parallel_size""".split())
# settings of NeMo 1 models that change the math and have no lifted form: (key, value that is fine)
_NEMO1_REFUSED = {"headscale": False, "megatron_legacy": False, "normalize_attention_scores": True,
                  "transformer_block_type": "pre_ln", "scale_positional_embedding": False}
_NEMO1_ACT: dict[str, dict[str, Any]] = {
    "gelu": {}, "geglu": {"gated_linear_unit": True}, "fast-geglu": {"gated_linear_unit": True},
    "swiglu": {"swiglu": True}, "fast-swiglu": {"swiglu": True}, "squared-relu": {"squared_relu": True}}
_NEMO1_NORM: dict[str, dict[str, Any]] = {
    "layernorm": {"normalization": "LayerNorm"}, "low_precision_layernorm": {"normalization": "LayerNorm"},
    "layernorm1p": {"normalization": "LayerNorm", "apply_layernorm_1p": True}, "rmsnorm": {"normalization": "RMSNorm"}}


def nemo1_args(cfg: Any, where: str, store: DcpStore) -> argparse.Namespace:
    """Megatron-LM args from a NeMo 1 ``model_config.yaml`` (an mcore GPT: ``mcore_gpt: true``)."""
    if not isinstance(cfg, dict) or "num_layers" not in cfg:
        raise ConfigError(f"{where}: not a NeMo 1 GPT model config (no num_layers)",
                          hint="copy the checkpoint again; mexc reads NeMo 1 GPT (mcore) models")
    cfg = plain(cfg)
    problems = [f"{k}={str(cfg.get(k))[:40]} (NeMo 1 setting without a lifted form)"
                for k, ok in _NEMO1_REFUSED.items() if cfg.get(k, ok) not in (ok, None)]
    if cfg.get("mcore_gpt") is not True:
        problems.append("mcore_gpt is not true (pre-mcore NeMo weights use other names)")
    ns: dict[str, Any] = {_NEMO1_RENAMED.get(k, k): cfg[k] for k in (*_NEMO1_COPIED, *_NEMO1_RENAMED) if k in cfg}
    problems += [f"{k}={v[:60]} (an OmegaConf interpolation mexc does not evaluate)" for k, v in ns.items()
                 if isinstance(v, str) and "${" in v]
    act, norm = str(cfg.get("activation", "gelu")), str(cfg.get("normalization", "layernorm"))
    if act not in _NEMO1_ACT or norm not in _NEMO1_NORM:
        problems.append(f"activation={act} / normalization={norm} (mexc lifts {', '.join(_NEMO1_ACT)} and "
                        f"{', '.join(_NEMO1_NORM)})")
    else:
        ns.update(_NEMO1_ACT[act])
        ns.update(_NEMO1_NORM[norm])
    ns["untie_embeddings_and_output_weights"] = not cfg.get("share_embeddings_and_output_weights", True)
    ns.setdefault("add_bias_linear", True)
    ns.setdefault("position_embedding_type", "learned_absolute")
    if ns.get("num_query_groups") and ns["num_query_groups"] != ns.get("num_attention_heads"):
        ns["group_query_attention"] = True
    return _finish(ns, problems, where, store)


def _finish(ns: dict, problems: list[str], where: str, store: DcpStore) -> argparse.Namespace:
    """Padded vocab and dtype from the saved embedding; the argument table's refusals; one error for all."""
    emb = store.tensors().get(_EMBEDDING)
    if emb is None:
        raise CheckpointError(f"{where}: its weights hold no {_EMBEDDING} (prefix {store.prefix!r})",
                              hint="a GPT checkpoint has word embeddings; copy the weights directory again")
    ns["padded_vocab_size"] = emb[1][0]
    if not ns.get("vocab_size") or ns["vocab_size"] > emb[1][0]:
        ns["vocab_size"] = emb[1][0]
    ns["params_dtype"] = emb[0]
    missing = [k for k in ("num_layers", "hidden_size", "num_attention_heads") if not isinstance(ns.get(k), int)]
    if missing:
        raise ConfigError(f"{where}: no {', '.join(missing)} (or not integers)",
                          hint="the config file is damaged; copy the checkpoint again")
    args = argparse.Namespace(**ns)
    problems = problems + arguments.apply(args).problems
    if problems:
        raise ConfigError(f"{where}: the config sets what mexc cannot express: " + "; ".join(problems),
                          hint="mexc never drops a setting that changes the model's math (docs/checkpoint-formats.md)")
    return args
