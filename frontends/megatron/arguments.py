"""The Megatron argument table: how mexc treats every argument a Megatron checkpoint saves.

Megatron-LM pickles its whole ``argparse`` namespace into every checkpoint (~400 names in 0.9, ~800 in 0.19;
most of them drive the training loop). Each argument that can change the forward pass has a row here, and every
other one belongs to a training-only category, so that no setting is ever silently dropped:

``honoured``    mexc reads it: ``field`` names the :class:`~.config.MegatronArch` field it feeds (and through
                the lift, the IR attribute ``by`` names). ``values``, when given, lists the values mexc honours;
                another value is refused like a ``refused`` row.
``refused``     mexc cannot express it: a value other than the default (or one of ``ok``) stops the lift with
                one error naming the argument, its value and ``fix``.
``irrelevant``  it cannot change what the saved weights compute at inference (optimizer, schedule, dropout,
                communication overlap, recompute, fusions, logging, ...); ``by`` says why.

The table is data: ``config.ARG_ALIASES`` (what ``from_args`` reads) is derived from the rows' ``field``,
``mexc inspect --args CKPT`` prints the verdict for a checkpoint's args, and the lift calls :func:`refuse`.
Argument names are Megatron-LM's ``argparse`` destinations (``megatron/training/arguments.py``); ``aliases``
are the same setting under older names, megatron-core ``TransformerConfig`` names and NeMo config names.
Release spans come from :mod:`.argument_versions` (see docs/arguments.md). This module holds the rows; what a row
is lives in :mod:`.argument_schema`, applying the table to saved args in :mod:`.argument_verdicts` (both
re-exported here).
"""

from __future__ import annotations

import re

from .argument_schema import (HONOURED, IRRELEVANT, REFUSED, Arg, H, I, R,  # noqa: F401 - re-exported
                              release_span, window_problem)

_NUMERICS = "precision only: the same math; the output dtype (--dtype) decides precision at inference"
_IMPL = "an implementation choice (kernel, fusion, backend): the same math"
_ONLY = "read only together with {}, which is refused"
_LAYOUT = "checkpoint layout / distribution: the lift reads it from the tensors and the rank files"
# the layer specs pretrain_mamba.py / pretrain_hybrid.py save for MambaModel / HybridModel
_MAMBA_SPEC = ["megatron.core.models.mamba.mamba_layer_specs", "mamba_stack_spec"]
_HYBRID_SPEC = ["megatron.core.models.hybrid.hybrid_layer_specs", "hybrid_stack_spec"]

# fmt: off
ROWS: tuple[Arg, ...] = (
    # ---- shape
    H("num_layers", None, "ModelConfig.num_layers", "num_layers", ("encoder_num_layers",)),
    H("hidden_size", None, "ModelConfig.hidden_size", "hidden_size"),
    H("ffn_hidden_size", None, "mlp params [ffn, hidden]", "ffn_hidden_size"),
    H("num_attention_heads", None, "attention.num_heads", "num_heads"),
    H("group_query_attention", False, "attention.num_kv_heads", "gqa"),
    H("num_query_groups", 1, "attention.num_kv_heads (with group_query_attention)", "num_query_groups"),
    H("kv_channels", None, "attention.head_dim", "kv_channels"),
    H("max_position_embeddings", None, "ModelConfig.max_position_embeddings", "max_position_embeddings",
      ("seq_length",)),
    H("padded_vocab_size", None, "embedding/lm_head rows", "padded_vocab_size"),
    H("vocab_size", None, "ModelConfig.vocab_size", "vocab_size"),
    H("untie_embeddings_and_output_weights", False, "lm_head.tied", "untie"),
    # ---- normalization and residual
    H("normalization", "LayerNorm", "norm.kind", "normalization", values=("LayerNorm", "RMSNorm")),
    H("layernorm_epsilon", 1e-5, "norm.eps", "norm_eps", ("norm_epsilon",)),
    H("layernorm_zero_centered_gamma", False, "norm.zero_centered", "zero_centered_gamma",
      ("apply_layernorm_1p",)),
    R("apply_residual_connection_post_layernorm", False, "the residual taken after the norm (BERT-style) "
      "has no "
      "IR form yet"),
    I("fp32_residual_connection", False, _NUMERICS),
    I("fused_residual_rmsnorm", False, _IMPL),
    I("no_persist_layer_norm", False, _IMPL),
    # ---- activations and linear layers
    H("swiglu", False, "mlp.gated + mlp.activation=silu", "swiglu"),
    H("squared_relu", False, "mlp.activation=squared-relu", "squared_relu"),
    H("openai_gelu", False, "mlp.activation=gelu-tanh", "openai_gelu"),
    H("gated_linear_unit", False, "mlp.gated (NeMo config)", "gated_linear_unit"),
    H("quick_geglu", False, "mlp.gated + mlp.activation=quick-gelu (x sigmoid(1.702 x); gpt-oss)", "quick_geglu"),
    H("glu_linear_offset", 0.0, "mlp.glu_offset / moe.glu_offset: act(gate) * (up + offset) (megatron-core glu())",
      "glu_offset"),
    H("activation_func_clamp_value", None, "mlp.glu_clamp / moe.glu_clamp: gate <= c, -c <= up <= c (megatron-core "
      "glu())", "glu_clamp"),
    I("onnx_safe", None, "export-time erf/tanh choice for ONNX tracing in Megatron-LM; GELU stays exact"),
    H("add_bias_linear", True, "params *_bias present", "add_bias_linear"),
    H("disable_bias_linear", False, "params *_bias absent (pre-0.9 name)", "disable_bias_linear"),
    H("add_qkv_bias", False, "attention.qkv_bias", "add_qkv_bias"),
    # ---- attention
    I("apply_query_key_layer_scaling", False, "Megatron divides QK by the layer number and multiplies it "
      "back in "
      "the softmax: the same math"),
    I("attention_softmax_in_fp32", False, _NUMERICS),
    H("softmax_scale", None, "attention.softmax_scale (None: 1/sqrt(kv_channels))", "softmax_scale"),
    H("softmax_type", "vanilla", "attention.sinks + the sinks param [num_heads] (megatron-core SoftmaxOne): learnable: "
      "the saved core_attention.softmax_offset; off-by-one: zeros", "softmax_type",
      values=("vanilla", "off-by-one", "learnable")),
    H("attention_output_gate", False, "attention.output_gate + gate (+ gate_bias) params: sigmoid(gate x) times "
      "the attention output before linear_proj (megatron-core SelfAttention._apply_output_gate)", "output_gate"),
    H("qk_layernorm", False, "attention.qk_norm + q_norm/k_norm params", "qk_layernorm"),
    H("qk_l2_norm", False, "attention.qk_norm = l2: weightless RMS normalization of q and k per head at "
      "layernorm_epsilon, before rotary (megatron-core L2Norm)", "qk_l2_norm"),
    I("qk_clip", False, "QK-clip rescales weights after optimizer steps (training only)"),
    H("window_size", None, "attention.window = L on windowed layers: keys i-L..i (megatron-core "
      "get_sliding_window_causal_mask)", "window_size", judge=window_problem),
    H("window_attn_skip_freq", None, "which layers are windowed (megatron-core is_layer_window_attention: int N: "
      "layer numbers n % N == 0 are full; list: 1 = windowed), read only with window_size", "window_skip"),
    H("multi_latent_attention", False, "an mla node per layer (DeepSeek multi-latent attention)", "mla"),
    H("q_lora_rank", None, "mla q_down / q_norm / q_up params (None: one q projection)", "q_lora_rank"),
    H("kv_lora_rank", 32, "mla.kv_lora_rank", "kv_lora_rank"),
    H("qk_head_dim", 128, "mla.qk_head_dim", "qk_head_dim"),
    H("qk_pos_emb_head_dim", 64, "mla.qk_rope_dim", "qk_pos_emb_head_dim"),
    H("v_head_dim", 128, "mla.v_head_dim", "v_head_dim"),
    H("rope_type", None, "mla.rope.scaling (MLA: None = yarn, MLATransformerConfig's default)", "rope_type",
      values=("rope", "yarn")),
    R("mla_down_proj_fusion", False, "fused MLA down projections are not lifted yet"),
    I("cache_mla_latents", False, _IMPL),
    R("experimental_attention_variant", None, "experimental attention variants (DSA, gated delta net) are "
      "not "
      "lifted"),
    R("linear_attention_freq", None, "linear-attention (gated delta net) layers are not lifted"),
    H("no_rope_freq", None, "attention.position=none on the NoPE layers (int N: every N-th; list: 1 = no rope)",
      "no_rope"),
    # ---- positions
    H("position_embedding_type", "learned_absolute", "attention.position / embedding.position",
      "position_embedding_type", values=("learned_absolute", "rope", "yarn", "none"),
      fix="mrope and relative positions are not lifted yet"),
    H("rotary_scaling_factor", 1.0, "rope.factor (yarn; MLA's softmax mscale)", "rotary_scaling_factor",
      ("yarn_rotary_scaling_factor",)),
    H("mscale", 1.0, "rope.mscale (yarn)", "mscale", ("yarn_mscale",)),
    H("mscale_all_dim", 0.0, "rope.mscale_all_dim (yarn; MLA's softmax mscale)", "mscale_all_dim",
      ("yarn_mscale_all_dim",)),
    H("yarn_original_max_position_embeddings", None, "rope.original_max_positions (yarn; None: 4096)",
      "yarn_original_max", ("original_max_position_embeddings",)),
    H("yarn_beta_fast", None, "rope.beta_fast (yarn; None: 32)", "yarn_beta_fast", ("beta_fast",)),
    H("yarn_beta_slow", None, "rope.beta_slow (yarn; None: 1)", "yarn_beta_slow", ("beta_slow",)),
    H("yarn_correction_range_round_to_int", None, "rope.truncate (yarn; None: True)", "yarn_round"),
    H("use_rotary_position_embeddings", False, "attention.position=rope (pre-mcore name)", "use_rotary"),
    I("add_position_embedding", True, "legacy-model switch; position_embedding_type and the saved "
      "position_embeddings tensor decide"),
    H("rotary_base", 10000, "attention.rope.base", "rotary_base"),
    H("rotary_percent", 1.0, "attention.rope.percent", "rotary_percent"),
    H("rotary_interleaved", False, "attention.rope.interleaved", "rotary_interleaved"),
    H("rotary_seq_len_interpolation_factor", None, "attention.rope.scaling=linear", "rope_interpolation"),
    H("use_rope_scaling", False, "attention.rope.scaling=llama3", "use_rope_scaling"),
    H("rope_scaling_factor", 8.0, "attention.rope.factor (with use_rope_scaling)", "rope_scaling_factor"),
    # ---- embedding / output
    H("embedding_multiplier", 1.0, "embedding.scale (NeMo: scale_embedding = sqrt(hidden))",
      "embedding_scale",
      ("scale_embedding",)),
    R("use_mup", False, "muP multipliers on embedding, attention and output are not lifted yet"),
    H("parallel_attn", False, "parallel attention + MLP wiring (NeMo config)", "parallel_attn",
      ("parallel_attention",)),
    R("spec", None, "a custom layer spec can change any part of the layer; mexc lifts the standard GPT "
      "specs and the Mamba / hybrid stack specs", ok=(_MAMBA_SPEC, _HYBRID_SPEC)),
    R("heterogeneous_layers_config_path", None, "heterogeneous (per-layer) blocks are not lifted"),
    R("heterogeneous_layers_config_encoded_json", None, "heterogeneous (per-layer) blocks are not lifted"),
    # ---- hybrid Mamba (MambaModel / HybridModel, Nemotron-H): one mixer per layer, M * - E
    H("hybrid_override_pattern", None, "one mamba / attention / mlp / moe node per layer (M * - E; | ignored)",
      "hybrid_pattern", ("hybrid_layer_pattern",)),
    I("is_hybrid_model", False, "the saved hybrid_override_pattern and the tensors decide the layers"),
    R("hybrid_attention_ratio", 0.0, "layers allocated by ratio are not lifted: give hybrid_override_pattern "
      "with --set / --config"),
    R("hybrid_mlp_ratio", 0.0, "layers allocated by ratio are not lifted: give hybrid_override_pattern "
      "with --set / --config"),
    H("mamba_state_dim", 128, "mamba.state_dim", "mamba_state_dim"),
    H("mamba_head_dim", 64, "mamba.head_dim", "mamba_head_dim"),
    H("mamba_num_groups", 8, "mamba.num_groups", "mamba_num_groups"),
    H("mamba_num_heads", None, "mamba.num_heads (unset: 2 x hidden / mamba_head_dim)", "mamba_num_heads"),
    H("mtp_num_layers", None, "the mtp.* tensors (multi-token-prediction heads) are dropped with a compile "
      "note: the main head's logits do not read them", "mtp_num_layers"),
    R("retro_add_retriever", False, "RETRO models are not lifted"),
    # ---- MoE
    H("num_experts", None, "moe.num_experts", "num_experts", ("num_moe_experts",)),
    H("moe_router_topk", 2, "moe.top_k", "moe_topk"),
    H("moe_ffn_hidden_size", None, "moe params [E, ffn, hidden]", "moe_ffn_hidden_size"),
    H("moe_router_score_function", "softmax", "moe.score (sigmoid: moe.norm_topk for top_k > 1)", "moe_score",
      values=("softmax", "sigmoid")),
    H("moe_router_pre_softmax", False, "moe.pre_softmax", "moe_pre_softmax"),
    H("moe_router_topk_scaling_factor", None, "moe.topk_scale (fold-moe-scaling folds it into fc2)",
      "moe_topk_scale"),
    H("moe_layer_freq", 1, "per layer: a moe node where the layer has a router, else mlp; the routers must be the "
      "layers megatron-core expands it to (int N: every N-th from 0, a 0/1 list, or its text)", "moe_layer_freq"),
    H("moe_router_num_groups", None, "moe.num_groups (group-limited top-k)", "moe_num_groups"),
    H("moe_router_group_topk", None, "moe.group_topk (group-limited top-k)", "moe_group_topk"),
    # no release's parse_args defines it (a development build between 0.10 and 0.11 did; TransformerConfig-only since)
    R("moe_router_topk_limited_devices", None, "device-limited routing is not lifted: a pre-0.11 development build "
      "picks ranks by their best expert score, megatron-core >= 0.11 reads it as moe_router_num_groups=<EP size>, "
      "moe_router_group_topk=N (sum of top scores); the args cannot tell which, so save them in the >= 0.11 form",
      ok=(0,)),
    H("moe_router_enable_expert_bias", False, "moe expert_bias param [E] (the router's saved expert_bias buffer)",
      "moe_expert_bias"),
    R("moe_router_force_load_balancing", False, "random-logit routing is a benchmark mode, not a model"),
    R("moe_router_load_balancing_type", "aux_loss", "Sinkhorn routing is not lifted",
      ok=("seq_aux_loss", "global_aux_loss", "none", ["aux_loss"], ["seq_aux_loss"], ["none"])),
    H("moe_shared_expert_intermediate_size", None, "moe.shared_expert + shared_* params [S, H] / [H, S]",
      "moe_shared_size"),
    H("moe_shared_expert_gate", False, "moe.shared_expert=sigmoid-gated + shared_expert_gate [1, H]",
      "moe_shared_gate"),
    R("moe_apply_probs_on_input", False, "routing weights applied to the expert input are not lifted"),
    R("moe_latent_size", None, "latent MoE projections are not lifted"),
    R("moe_mlp_glu_interleave_size", None, "interleaved GLU expert weights are not lifted"),
    R("moe_shared_expert_glu_interleave_size", None, "interleaved GLU expert weights are not lifted"),
    R("moe_single_grouped_weight", False, "single grouped expert tensors are not lifted"),
    R("moe_single_grouped_bias", False, "single grouped expert tensors are not lifted"),
    R("moe_use_upcycling", False, "upcycling builds the MoE from a dense checkpoint at load time; convert "
      "the "
      "MoE checkpoint it saved"),
    I("moe_router_dtype", None, _NUMERICS),
    I("moe_expert_capacity_factor", None, "token dropping is a training-time capacity limit; inference "
      "engines "
      "(and mexc's outputs) route dropless"),
    I("moe_pad_expert_input_to_capacity", False, "token dropping is a training-time capacity limit"),
    I("moe_token_drop_policy", "probs", "token dropping is a training-time capacity limit"),
    I("moe_input_jitter_eps", None, "router input jitter is applied in training mode only"),
    I("moe_grouped_gemm", False, _LAYOUT + " (local_experts.*, TE grouped linear_fc1.weightE or legacy "
      "GroupedMLP weight1/weight2 keys)"),
    I("moe_use_legacy_grouped_gemm", False, _LAYOUT + " (legacy GroupedMLP weight1/weight2: each expert lifted "
      "as a view)"),
    # ---- precision, parallelism, layout
    H("bf16", False, "ModelConfig.dtype", "bf16"),
    H("fp16", False, "ModelConfig.dtype", "fp16"),
    H("params_dtype", None, "ModelConfig.dtype", "params_dtype"),
    H("tensor_model_parallel_size", 1, "source TP merge", "tp", ("model_parallel_size",)),
    H("pipeline_model_parallel_size", 1, "source PP stages", "pp"),
    H("virtual_pipeline_model_parallel_size", None, "source virtual-pipeline chunks", "vp"),
    H("expert_model_parallel_size", 1, "source expert ranks", "ep"),
    H("decoder_first_pipeline_num_layers", None, "stage layer counts", "first_stage_layers"),
    H("decoder_last_pipeline_num_layers", None, "stage layer counts", "last_stage_layers"),
    H("transformer_impl", "transformer_engine", "key mapping (local and TE names)", "transformer_impl"),
    H("use_legacy_models", False, "key mapping (language_model.* rules)", None),
    R("pipeline_model_parallel_layout", None, "a custom pipeline layout is not read yet; re-save with "
      "decoder_first/last_pipeline_num_layers or convert to torch_dist"),
    I("expert_tensor_parallel_size", None, _LAYOUT),
    I("num_layers_per_virtual_pipeline_stage", None, _LAYOUT),
    I("num_virtual_stages_per_pipeline_rank", None, _LAYOUT),
    I("account_for_embedding_in_pipeline_split", False, _LAYOUT),
    I("account_for_loss_in_pipeline_split", False, _LAYOUT),
    I("make_vocab_size_divisible_by", 128, "the padded vocab is read from the embedding tensor"),
    # ---- only read together with a refused argument
    I("mrope_section", None, _ONLY.format("position_embedding_type=mrope")),
    I("relative_attention_num_buckets", 32, _ONLY.format("position_embedding_type=relative")),
    I("relative_attention_max_distance", 128, _ONLY.format("position_embedding_type=relative")),
    *(I(n, d, _ONLY.format("use_mup")) for n, d in (
        ("mup_attn_scale_power", 1.0), ("mup_base_head_dim", None), ("mup_base_hidden_size", None),
        ("mup_embedding_mult", 1.0), ("mup_output_mult", 1.0), ("mup_width_mult", 1.0))),
    *(I(n, d, "a multi-token-prediction training setting: the mtp.* heads are dropped") for n, d in (
        ("mtp_loss_scaling_factor", 0.1), ("mtp_standalone", False), ("mtp_use_repeated_layer", False),
        ("mtp_detach_heads", False), ("mtp_hybrid_override_pattern", None))),
    *(I(n, d, _ONLY.format("hybrid / linear attention")) for n, d in (("linear_conv_kernel_dim", 4),
        ("linear_key_head_dim", 128), ("linear_value_head_dim", 128), ("linear_num_key_heads", 16),
        ("linear_num_value_heads", 32))),
)
# fmt: on

# Every other argument is training-only: the first category whose pattern matches the name says why.
CATEGORIES: tuple[tuple[str, str], ...] = (
    (r"(dsa_|qk_clip_|mamba_)", "read only together with a refused setting (experimental_attention_variant, "
     "qk_clip, hybrid Mamba)"),
    (r"(adam|sgd|lion|muon|optimizer|weight_decay|start_weight|end_weight|clip_grad|loss_scale|initial_loss"
     r"|min_loss|hysteresis|use_distributed_optimizer|use_precision_aware|exp_avg|main_grads|main_params|"
     r"accumulate_allreduce|use_torch_optimizer|overlap_cpu_optimizer|pin_cpu|apply_wd|head_lr|decoupled|"
     r"no_weight_decay)", "optimizer and loss scaling"),
    (r"(lr|min_lr|warmup|train_iters|train_samples|rampup|global_batch|micro_batch|batch_size|"
     r"eval_|exit_|skip_train|iterations_to_skip|phase_transition|step_batch|decrease_batch|"
     r"consumed_|curr_iteration|iteration|num_floating|skipped_train|do_train|do_valid|do_test|to_test|"
     r"full_validation|multiple_validation|validation_set|start_eval|iter_per_epoch|_is_global)",
     "learning-rate schedule, batch sizes, iteration counters"),
    (r"(hidden_dropout|attention_dropout|.*dropout)", "dropout is off at inference"),
    (r"(init_method|embedding_init|perform_initialization|use_cpu_initialization|init_model_with_meta|"
     r"data_parallel_random_init|seed|offset_sampling|te_rng_tracker)", "initialization and seeds: the "
       "saved weights are the model"),
    (r"(recompute|checkpoint_activations|distribute_saved|cpu_offloading|activation_offload|offload|"
     r"fine_grained|min_offloaded|delay_offload|moe_layer_recompute|mlp_chunks)", "activation recompute / "
       "offload"),
    (r"(tp_comm|overlap|sequence_parallel|context_parallel|cp_comm|hierarchical_context|hybrid_context|"
     r"ddp_|data_parallel|use_megatron_fsdp|use_torch_fsdp|use_custom_fsdp|fsdp|megatron_fsdp|"
     r"outer_dp|num_distributed|gradient_accumulation|grad_reduce|gradient_reduce|align_|"
     r"defer_embedding|delay_wgrad|wgrad|deallocate|batch_p2p|use_ring|scatter_gather|distributed_|"
     r"nccl|sharp|use_sharp|create_all_gather|use_gloo|enable_gloo|world_size|rank|local_rank|"
     r"pipeline_model_parallel_comm|pipeline_model_parallel_split|microbatch_group|variable_seq|"
     r"encoder_pipeline|encoder_tensor|expert_tensor_parallel_num|tensor_parallel_num|transformer_pipeline|"
     r"standalone_embedding|moe_token_dispatcher|moe_enable_deepep|moe_deepep|moe_flex|moe_hybridep|"
     r"moe_ncclep|moe_permute|moe_router_fusion|moe_pad_experts|moe_paged|moe_extended_tp|"
     r"high_priority|use_tp_pp_dp|lazy_mpu|fake_process|ep_overlap|symmetric|disable_symmetric|"
     r"moe_shared_expert_overlap|use_grouped_gemm|suggested_comm|replication|barrier|"
     r"async_tensor|cross_entropy|fp16_lm|calculate_per_token|max_seqlen_per|torch_fsdp2|"
     r"enable_full_sharding|"
     r"distrib_optim|delta_offload)",
     "parallel communication, overlap and distribution of the training run"),
    (r"(moe_aux|moe_z_loss|moe_router_bias_update|moe_per_layer|moe_router_padding|moe_routing_trace|"
     r"moe_enable_routing_replay|moe_router_quantile|moe_router_force_biased|moe_upcycling|"
     r"moe_expert_rank_capacity|mtp_loss|dsa_indexer_loss|dsa_indexer_use_sparse)",
     "MoE load-balancing losses and training-time routing aids"),
    (r"(fp8|fp4|first_last_layers_bf16|num_layers_at_|te_precision|kitchen|use_kitchen|keep_fp8|"
     r"reuse_grad_buf|disable_bf16|quant|use_transformer_engine_op|stream_ckpt)",
     "low-precision training recipes: the checkpoint's weights are read as saved"),
    (r"(bias_gelu|bias_swiglu|bias_dropout|masked_softmax|apply_rope_fusion|use_flash|attention_backend|"
     r"flash_|persist_layer|memory_efficient|disable_jit|use_fused|use_te_|clone_scatter|cuda_graph|"
     r"enable_cuda_graph|external_cuda|decode_only|batch_invariant|deterministic|test_mode|"
     r"use_mamba_mem|disable_mamba|cache_mla|gradient_accumulation_fusion|dsa_kernel|"
     r"use_legacy_static|moe_router_fusion|swin|use_layer_wise)", _IMPL),
    (r"(save|load|ckpt|dist_ckpt|async_|use_dist_ckpt|non_persistent|use_checkpoint|auto_detect|"
     r"finetune|pretrained|no_load|no_save|exit_on_missing|override_ckpt|override_opt|use_persistent|"
     r"verify_integrity|strict_fsdp|retro_project|use_mp_args|load_main|load_model_opt|"
     r"dump_param|refit|inference_shards)", "checkpoint I/O of the training run"),
    (r"(log|tensorboard|wandb|one_logger|enable_one_logger|timing|profile|pytorch_profiler|record_|"
     r"memory_snapshot|nvtx|straggler|app_tag|enable_ft|ft_|calc_ft|check_|rerun|error_injection|"
     r"result_rejected|fault_injector|inprocess|flight_recorder|manual_gc|empty_unused|"
     r"gpu_sniff|run_workload|adlr|enable_experimental|config_logger|log_|save_.*_interval|"
     r"disable_straggler|trust_remote|yaml_cfg|enable_msc|disable_msc|object_storage|"
     r"capture|dataloader_|num_workers|empty|sft|chat_template|train_sync|use_pytorch_profiler)", "logging, "
       "profiling, fault tolerance"),
    (r"(data|split|vocab_file|merge_file|tokenizer|tiktoken|null_tokenizer|special_tokens|vocab_extra|"
     r"legacy_tokenizer|mock_data|mmap|eod_mask|reset_|create_attention_mask|fim_|titles_|evidence_|"
     r"block_data|embedding_path|indexer_|per_split|per_dataset|num_dataset|mid_level|renormalize|"
     r"s3_cache|allow_ambiguous|sample_rate|short_seq|mask_|use_one_sent|query_in|num_channels|"
     r"num_classes|img_|patch_dim|classes_fraction|data_per_class|dino_|vision_|bert_|biencoder|"
     r"ict_|retriever|retro_|seq_length|encoder_seq|decoder_seq|decoder_num_layers|output_bert|"
     r"model_type|use_mcore|deprecated|encoder_num|modelopt|cpu_offloading|train_data|valid_data|test_data|"
     r"metadata_path|pad_vocab|use_tokenizer)", "data, tokenizer, other model types"),
    (r"(inference_|rl_|grpo_|langrl_|perform_rl|num_speculative|max_tokens_to_oom|enable_chunked|"
     r"disable_chunked|nccl_all_reduce|logits_|freeze_all|use_legacy_models|kv_channels_unused|"
     r"inference|indexer)", "inference-server, RL and distillation settings of Megatron itself"),
)
_CATEGORY_RX = tuple((re.compile(rf"^(?:{p})"), why) for p, why in CATEGORIES)

BY_NAME: dict[str, Arg] = {}
for _row in ROWS:
    for _n in (_row.name, *_row.aliases):
        if _n in BY_NAME:
            raise AssertionError(f"argument {_n!r} has two rows")
        BY_NAME[_n] = _row


def lookup(name: str) -> Arg | None:
    """The row for ``name``: its own, or an ``irrelevant`` row of its training-only category; None if
    unknown."""
    row = BY_NAME.get(name)
    if row is not None:
        return row
    for rx, why in _CATEGORY_RX:
        if rx.match(name):
            return I(name, None, "training only: " + why)
    return None


def arg_aliases() -> dict[str, tuple[str, ...]]:
    """MegatronArch field -> argument names to try, newest first (what ``config.from_args`` reads)."""
    return {r.field: (r.name, *r.aliases) for r in ROWS if r.field}


# the judging code lives in .argument_verdicts, which imports this table: re-exported on first use (PEP 562)
_VERDICTS = ("Verdicts", "apply", "refuse", "status", "describe")


def __getattr__(name: str):
    if name in _VERDICTS:
        from . import argument_verdicts

        return getattr(argument_verdicts, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Arg", "ROWS", "CATEGORIES", "BY_NAME",
           "lookup", "arg_aliases", *_VERDICTS,
           "release_span", "HONOURED", "REFUSED", "IRRELEVANT"]
