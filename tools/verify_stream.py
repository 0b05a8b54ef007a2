"""Prefill logits in bounded memory, one layer at a time, for `mexc verify` (issues 19 item 9, 21 item 3).

Two runners, each holding the weights of one node (one layer op) at a time instead of the whole model:

* :func:`stream_logits`: an IR model (the source lifted from a checkpoint, or a trtllm output lifted back by
  mexc's reader :func:`mexc.frontends.trtllm.lift_trtllm`) through the reference interpreter's per-node
  functions (``op_embedding``, ``op_attention``, ...). Before a node runs, its params are materialized from
  their lazy recipes; after it, the materialized tensors are dropped and the stores are told to release the
  pages (``Recipe.release``); activations are dropped once their last user has run. The arithmetic is the
  interpreter's own, so the logits are bit-identical to the whole-model path (``run``), which keeps every
  materialized weight in one cache until the end. Peak memory: the hidden states ``[b, s, hidden]`` of the
  prompts plus one node's weights, as stored and once more in the compute dtype (float32: the interpreter's
  attention promotes rotary tables to float32, so it cannot compute in bfloat16/float16 itself).
* :func:`hf_logits`: an hf output through transformers' own modules. The model is instantiated with its
  parameters on the ``meta`` device (no memory; buffers computed as usual), and each module with parameters
  gets its tensors from the output's safetensors files just before its forward and gives them back just
  after (torch ``forward_pre_hook`` / ``forward_hook``), read as stored (the output's own dtype) and upcast to
  float32 for that module only. Peak memory: the largest module's weights (one Linear or the embedding).
  Where the model's parameters are not the files' tensors one to one (transformers renames or fuses them at
  load time for some families, e.g. MoE experts) or the config asks for a quantizer, the whole model is
  loaded instead, in the output's dtype (peak: the output's weight bytes); the description returned says so.

Errors: a tensor a store cannot read raises the store's :class:`mexc.errors.IRError` (named file and key).
"""

from __future__ import annotations

import importlib
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import torch

from ..ir import SafetensorsStore

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_INTERPRETERS = ("mexc.ir.interpreter", "mexc.backends.reference.executor")  # new home, then the old one


def interpreter():
    """The reference interpreter's executor class (``ReferenceExecutor``: ``op_<name>(node, *inputs, pos)``
    per IR op and a weight reader ``.w`` whose ``.cache`` holds materialized params)."""
    for name in _INTERPRETERS:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(mod, "ReferenceExecutor"):
            return mod.ReferenceExecutor
    raise ImportError(f"no reference interpreter found in {', '.join(_INTERPRETERS)}")


def stream_logits(model, input_ids: torch.Tensor, *, dtype: torch.dtype = torch.float32,
                  simulate_ranks: bool | None = None, on_node=None) -> torch.Tensor:
    """Prefill logits ``[b, s, V]`` (V = lm_head rows) of ``model`` for ``input_ids`` ``[b, s]`` (int64),
    computed node by node with only the running node's weights materialized.

    ``dtype`` and ``simulate_ranks`` mean what they mean to the interpreter (``run``): tensor-parallel ranks
    are simulated for a model laid out for tp > 1. ``on_node(node)``, when given, is called after each node
    once its weights are dropped (tests measure memory there)."""
    ex = interpreter()(model, dtype=dtype, simulate_ranks=simulate_ranks)
    b, s = input_ids.shape
    pos = torch.arange(s).expand(b, s)
    graph = model.graph
    left = Counter(id(v) for node in graph.nodes for v in node.inputs)  # uses still to run, per value
    for v in graph.outputs:
        left[id(v)] += 1
    env: dict[int, torch.Tensor] = {id(graph.inputs[0]): input_ids}
    with torch.no_grad():
        for node in graph.nodes:  # stages are contiguous and in order
            args = [env[id(v)] for v in node.inputs]
            try:
                env[id(node.output)] = getattr(ex, "op_" + node.op)(node, *args, pos=pos)
            finally:
                ex.w.cache.clear()  # this node's materialized weights (and their per-rank shards)
                for p in node.params.values():
                    p.source.release()  # memory-mapped stores drop the pages this node read
            del args
            for v in node.inputs:
                left[id(v)] -= 1
                if left[id(v)] <= 0:
                    env.pop(id(v), None)
            if on_node is not None:
                on_node(node)
    return env[id(graph.outputs[0])]


# ----------------------------------------------------------------------------------------- transformers


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
              "I32": torch.int32,
              "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


class Unmapped:
    """The tensors of safetensors files, read with plain ``read`` calls into fresh memory instead of through a
    memory map: pages of a mapped file stay in the process's RSS (RssFile) until it is unmapped, so reading a
    whole output through ``safe_open`` puts its full size in the RSS (1.8 GB for a 0.9B bf16 model) although
    only one layer is in use. Offsets come from :func:`mexc.tools.integrity.safetensors_spans` (the header
    checked), shapes from the ``safetensors`` library; the files passed ``check_artifact`` before."""

    def __init__(self, files):
        from safetensors import safe_open

        from ..errors import BackendError
        from .integrity import safetensors_spans

        self.where: dict[str, tuple[Path, int, int, torch.dtype, tuple]] = {}
        for f in files:
            spans, why = safetensors_spans(f)
            if why:
                raise BackendError(f"{f}: {why}", hint="the output was damaged; compile it again")
            with safe_open(f, framework="pt") as h:
                for sp in spans:
                    shape = tuple(h.get_slice(sp.name).get_shape())
                    self.where[sp.name] = (f, sp.offset, sp.length, _ST_DTYPES[sp.dtype], shape)

    def shape(self, name: str) -> tuple:
        return self.where[name][4]

    def read(self, name: str) -> torch.Tensor:
        path, offset, length, dtype, shape = self.where[name]
        buf = torch.empty(length, dtype=torch.uint8)
        view, done = memoryview(buf.numpy()), 0
        with open(path, "rb", buffering=0) as f:
            f.seek(offset)
            while done < length:
                n = f.readinto(view[done:])
                if not n:
                    raise OSError(f"{path}: tensor {name!r} ends past the end of the file")
                done += n
        return buf.view(dtype).reshape(shape)


class UnmappedSafetensorsStore(SafetensorsStore):
    """A :class:`mexc.ir.SafetensorsStore` (same name, root and keys ``file:tensor``) that reads through
    :class:`Unmapped`; :func:`unmapped` puts it in place of the mapped one."""

    def __init__(self, name: str, root: str):
        super().__init__(name, root)
        self._files: dict[str, Unmapped] = {}

    def read(self, key, type):
        fname, tname = key.split(":", 1)
        if fname not in self._files:
            self._files[fname] = Unmapped([Path(self.root) / fname])
        return self._files[fname].read(tname)


def unmapped(model):
    """``model`` with the leaves of its recipes that read a :class:`SafetensorsStore` (the trtllm reader's)
    moved to an :class:`UnmappedSafetensorsStore` of the same name (recipe keys unchanged); returns it."""
    new: dict[int, UnmappedSafetensorsStore] = {}
    for node in model.graph.nodes:
        for p in node.params.values():
            for leaf in p.source.leaves():
                st = leaf.store
                if type(st) is SafetensorsStore:
                    leaf.store = new.setdefault(id(st), UnmappedSafetensorsStore(st.name, st.root))
    for k, st in list(model.stores.items()):
        if id(st) in new:
            model.stores[k] = new[id(st)]
    return model


def _module_keys(model, where: Unmapped) -> dict[str, str] | None:
    """Parameter name -> tensor name in the files, for every parameter of ``model`` (tied parameters, e.g.
    ``lm_head.weight`` = ``model.embed_tokens.weight``, share the one tensor that is stored); None when a
    parameter has no stored tensor of its shape (transformers would convert the files at load time)."""
    names: dict[int, list[str]] = {}
    params = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(n)
        params[n] = p
    keys = {}
    for n, p in params.items():
        stored = [k for k in names[id(p)] if k in where.where]
        if not stored or where.shape(stored[0]) != tuple(p.shape):
            return None
        keys[n] = stored[0]
    return keys


@contextmanager
def _parameters_on_meta():
    """Every ``nn.Parameter`` registered inside is moved to the ``meta`` device as it is registered (its
    ``torch.empty`` storage, never touched, is freed at once; initializers then run on meta), while buffers
    are computed on the CPU as the module's ``__init__`` computes them (rotary ``inv_freq``, Gemma's
    ``embed_scale``). The idea of accelerate's ``init_empty_weights(include_buffers=False)``."""
    register = torch.nn.Module.register_parameter

    def on_meta(self, name, param):
        if param is not None and not param.is_meta:
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(self, name, param)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def _streaming_model(out: Path, dtype: torch.dtype):
    """A transformers model on ``meta`` whose modules load their weights from the files around their forward;
    None when this family's parameters are not the files' tensors one to one."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(out)
    if getattr(cfg, "quantization_config", None):
        return None
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.eval()
    where = Unmapped(sorted(out.glob("*.safetensors")))
    keys = _module_keys(model, where)
    if keys is None or any(b.is_meta for b in model.buffers()):
        return None

    def load(mod, args):
        for n, p in list(mod._parameters.items()):
            if p is not None:
                k = keys[mod._mexc_prefix + n]
                mod._parameters[n] = torch.nn.Parameter(where.read(k).to(dtype), requires_grad=False)

    def drop(mod, args, output):
        for n, p in list(mod._parameters.items()):
            if p is not None:
                gone = torch.empty_like(p, device="meta")
                mod._parameters[n] = torch.nn.Parameter(gone, requires_grad=False)

    for name, mod in model.named_modules():
        if any(p is not None for p in mod._parameters.values()):
            mod._mexc_prefix = name + "." if name else ""
            mod.register_forward_pre_hook(load)
            mod.register_forward_hook(drop)
    return model


def hf_logits(out: Path, tokens: torch.Tensor, stored: torch.dtype, *, stream: bool = True):
    """Prefill logits ``[b, s, vocab]`` (float32) of an hf output run by transformers, and how it ran (for the
    ``runtime:`` line). ``stored``: the dtype the output's weights are written in.

    Streamed (the default, where the family allows): the weights stay as stored on disk and are upcast to
    float32 one module at a time, so the logits carry the output's own weights without bfloat16 arithmetic
    noise (measured on a 7B output: computing in bfloat16 gave max |delta| 0.28 and 81 % top-1 against the
    float32 reference for a correct output, beyond the bfloat16 tolerance). Whole model (``stream=False`` or
    a family whose parameters are not the files' tensors): loaded in ``stored``, so memory stays at the
    output's size, and computed in it."""
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    name = str(stored).removeprefix("torch.")
    model = _streaming_model(out, torch.float32) if stream else None
    if model is not None:
        how = (f"transformers {transformers.__version__} (AutoModelForCausalLM) on the output, weights {name} "
               "as stored, upcast to float32 one module at a time (one module's weights in memory at a time)")
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(out, dtype=stored)
        how = (f"transformers {transformers.__version__} (AutoModelForCausalLM, {name}) on the output, whole "
               "model in memory" + (" (its parameters are not the files' tensors one to one)" * stream))
    with torch.no_grad():
        return model(tokens, use_cache=False).logits.float(), how
