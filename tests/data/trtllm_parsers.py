# ruff: noqa  (declarations copied for parsing with ast; never imported)
# The argument declarations of TensorRT-LLM's serving entry points (NVIDIA/TensorRT-LLM, Apache-2.0), copied
# for tests/test_served.py, which parses them with `ast` (this file is never imported) and checks the serve
# commands mexc prints. Declarations only: help texts and the function bodies are left out; nothing else is
# changed. Sources, at the commits named:
#   SERVE:    tensorrt_llm/commands/serve.py @ 00209af149e7774406881a37283dce303571eb11 (`trtllm-serve`)
#   RUN:      examples/run.py                @ 05316d3313360012536ace46c781518f5afae75e (parse_arguments)
#   RUN_COMMON: examples/utils.py            @ 06255cb759835a9797b656aa5d1dc8f7e75fdca6 (add_common_args,
#             the model and runtime arguments run.py uses)


@click.command("serve")
@click.argument("model", type=str)
@click.option("--tokenizer", type=str, default=None)
@click.option("--custom_tokenizer", type=str, default=None)
@click.option("--host", type=str, default="localhost")
@click.option("--port", type=int, default=8000)
@click.option("--backend", type=ChoiceWithAlias(["pytorch", "tensorrt", "_autodeploy"], {"trt": "tensorrt"}),
              default="pytorch")
@click.option("--custom_module_dirs", type=click.Path(exists=True, readable=True, path_type=Path, resolve_path=True),
              default=None, multiple=True)
@click.option('--log_level', type=click.Choice(severity_map.keys()), default='info')
@click.option("--max_beam_width", type=int, default=BuildConfig.model_fields["max_beam_width"].default)
@click.option("--max_batch_size", type=int, default=BuildConfig.model_fields["max_batch_size"].default)
@click.option("--max_num_tokens", type=int, default=BuildConfig.model_fields["max_num_tokens"].default)
@click.option("--max_seq_len", type=int, default=BuildConfig.model_fields["max_seq_len"].default)
@click.option("--tensor_parallel_size", "--tp_size", type=int, default=1)
@click.option("--pipeline_parallel_size", "--pp_size", type=int, default=1)
@click.option("--context_parallel_size", "--cp_size", type=int, default=1)
@click.option("--moe_expert_parallel_size", "--ep_size", type=int, default=None)
@click.option("--moe_cluster_parallel_size", "--cluster_size", type=int, default=None)
@click.option("--gpus_per_node", type=int, default=None)
@click.option("--free_gpu_memory_fraction", "--kv_cache_free_gpu_memory_fraction", type=float, default=0.9)
@click.option("--num_postprocess_workers", type=int, default=0)
@click.option("--trust_remote_code", is_flag=True, default=False)
@click.option("--revision", type=str, default=None)
@click.option("--config", "--extra_llm_api_options", "extra_llm_api_options", type=str, default=None)
@click.option("--reasoning_parser", type=click.Choice(ReasoningParserFactory.parsers.keys()), default=None)
@click.option("--tool_parser", type=click.Choice(ToolParserFactory.parsers.keys()), default=None)
@click.option("--metadata_server_config_file", type=str, default=None)
@click.option("--server_role", type=str, default=None)
@click.option("--fail_fast_on_attention_window_too_large", is_flag=True, default=False)
@click.option("--otlp_traces_endpoint", type=str, default=None)
@click.option("--disagg_cluster_uri", type=str, default=None)
@click.option("--enable_chunked_prefill", is_flag=True, default=False)
@click.option("--media_io_kwargs", type=str, default=None)
@click.option("--chat_template", type=str, default=None)
def serve():
    ...


def RUN(parser):
    parser.add_argument('--max_input_length', type=int, default=923)
    parser.add_argument('--max_output_len', type=int, required=True)
    parser.add_argument('--input_text', type=str, nargs='+', default=["Born in north-east France, Soyer trained as a"])
    parser.add_argument('--input_file', type=str, default=None)
    parser.add_argument('--output_csv', type=str, default=None)
    parser.add_argument('--output_npy', type=str, default=None)
    parser.add_argument('--output_logits_npy', type=str, default=None)
    parser.add_argument('--output_log_probs_npy', type=str, default=None)
    parser.add_argument('--output_cum_log_probs_npy', type=str, default=None)
    parser.add_argument('--run_profiling', default=False, action='store_true')


def RUN_COMMON(parser):
    parser.add_argument('--random_seed', type=int, default=0)
    parser.add_argument('--early_stopping', type=int, default=1)
    parser.add_argument('--end_id', default=None, type=int)
    parser.add_argument('--stop_words', default=None, type=str, nargs="+", action='append')
    parser.add_argument('--bad_words', default=None, type=str, nargs="+", action='append')
    parser.add_argument('--no_repeat_ngram_size', type=int, default=None)
    parser.add_argument('--sink_token_length', type=int, default=None)
    parser.add_argument('--max_attention_window_size', type=int, default=None, nargs="+")
    parser.add_argument('--enable_context_fmha_fp32_acc', action='store_true')
    parser.add_argument('--cuda_graph_mode', action='store_true')
    parser.add_argument('--log_level', type=str, choices=['verbose', 'info', 'warning', 'error', 'internal_error'],
                        default='info')
    parser.add_argument('--no_prompt_template', dest='use_prompt_template', default=True, action='store_false')
    parser.add_argument('--use_py_session', default=False, action='store_true')
    parser.add_argument('--debug_mode', default=False, action='store_true')
    parser.add_argument('--streaming', default=False, action='store_true')
    parser.add_argument('--streaming_interval', type=int, default=5)
    parser.add_argument('--engine_dir', type=str, default='engine_outputs')
    parser.add_argument('--tokenizer_type')
    parser.add_argument('--vocab_file')
    parser.add_argument('--no_add_special_tokens', dest='add_special_tokens', default=True, action='store_false')
    parser.add_argument('--hf_model_dir', '--model_dir', type=str, default=None)
    parser.add_argument('--tokenizer_dir', default=None)
    parser.add_argument('--gpu_weights_percent', default=1, type=float)
    parser.add_argument('--max_tokens_in_paged_kv_cache', default=None, type=int)
    parser.add_argument('--kv_cache_enable_block_reuse', action='store_true')
    parser.add_argument('--kv_cache_free_gpu_memory_fraction', default=0.9, type=float)
    parser.add_argument('--enable_chunked_context', action='store_true')
