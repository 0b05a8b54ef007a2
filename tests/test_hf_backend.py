"""The Hugging Face target: compile real megatron-core checkpoints, load them with transformers, compare logits
with megatron-core's own (fixtures' reference.pt) or, where the fixture was altered by a config override, with
mexc's reference executor."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

from megatron_fixtures import have_megatron_core, load_reference, megatron_checkpoint

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not have_megatron_core(), reason="megatron-core not installed")

from mexc.backends.base import CompileOptions  # noqa: E402
from mexc.driver import compile_checkpoint, get_backend, lift  # noqa: E402
from mexc.errors import BackendError  # noqa: E402

FP32_TOL = 1e-4
V = 100  # the fixtures' vocabulary (NullTokenizer: 99 ids + eod); by default every target trims Megatron's padding
BF16_TOL = 2e-2  # bf16 weights *and* bf16 compute in transformers; measured ~4e-3 on logits of magnitude ~1


def want(ref):
    """megatron-core's logits over the vocabulary (its padding rows' logits are not part of any output)."""
    return ref["logits"][..., :V]


def _load(out, dtype=torch.float32):
    transformers.logging.set_verbosity_error()
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=dtype, output_loading_info=True)
    bad = {k: v for k, v in info.items() if v}
    assert not bad, f"transformers reports {bad}"
    return model.eval()


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits.float()


def _header(path: Path) -> dict:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n])


def _tensor_names(out: Path) -> set[str]:
    names = set()
    for f in out.glob("*.safetensors"):
        names |= {k for k in _header(f) if k != "__metadata__"}
    return names


CASES = [
    # (kind, tp, pp, fmt, HF class)
    ("llama", 2, 1, "torch", "LlamaForCausalLM"),
    ("llama", 1, 2, "torch_dist", "LlamaForCausalLM"),
    ("gpt", 1, 2, "torch_dist", "GPT2LMHeadModel"),
    ("mqa", 1, 1, "torch", "LlamaForCausalLM"),
    ("moe", 1, 1, "torch", "MixtralForCausalLM"),
]


@pytest.mark.parametrize("kind,tp,pp,fmt,cls", CASES, ids=[f"{c[0]}-tp{c[1]}-pp{c[2]}-{c[3]}" for c in CASES])
def test_fp32_logits_match_megatron(tmp_path, kind, tp, pp, fmt, cls):
    d = megatron_checkpoint(kind, tp=tp, pp=pp, fmt=fmt)
    ref = load_reference(d)
    out = tmp_path / "hf"
    res = compile_checkpoint(d / "ckpt", out, CompileOptions(target="hf"))
    assert {"config.json", "generation_config.json", "model.safetensors"} <= set(res.emit.files)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == [cls]
    assert cfg["vocab_size"] == V                       # Megatron's padding rows trimmed (the saved args' vocab)
    assert cfg["dtype"] == "float32"
    assert cfg["bos_token_id"] is None and cfg["eos_token_id"] is None
    assert _header(out / "model.safetensors")["__metadata__"] == {"format": "pt"}
    model = _load(out)
    assert type(model).__name__ == cls
    logits = _logits(model, ref["tokens"])
    assert logits.shape == want(ref).shape
    err = (logits - want(ref)).abs().max().item()
    assert err < FP32_TOL, f"{kind}: max |delta logits| = {err}"
    names = _tensor_names(out)
    if kind == "gpt":
        assert cfg["tie_word_embeddings"] is True and "lm_head.weight" not in names
        assert cfg["activation_function"] == "gelu"     # Megatron's exact erf gelu, not gelu_new (tanh)
        assert cfg["n_positions"] == 32
        assert model.transformer.h[0].attn.c_attn.weight.shape == (64, 192)  # Conv1D [in, out]
    else:
        assert cfg["tie_word_embeddings"] is False and "lm_head.weight" in names
        assert cfg["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0}
    if kind == "mqa":
        assert (cfg["head_dim"], cfg["num_key_value_heads"]) == (32, 1)
    if kind == "moe":
        assert (cfg["num_local_experts"], cfg["num_experts_per_tok"], cfg["intermediate_size"]) == (4, 2, 64)
        for e in range(4):
            for w in ("w1", "w2", "w3"):
                assert f"model.layers.1.block_sparse_moe.experts.{e}.{w}.weight" in names
    # the manifest's checksums cover every tensor written
    man = json.loads((out / "mexc-manifest.json").read_text())
    assert set(man["files"]["model.safetensors"]) == names


def test_qwen2_with_full_rotary(tmp_path):
    """The qwen fixture (q/k/v bias only) with rotary_percent overridden to 1: Qwen2ForCausalLM, compared with
    mexc's reference executor on the same (overridden) model; megatron-core's logits (partial rotary) differ."""
    d = megatron_checkpoint("qwen", fmt="torch")
    ref = load_reference(d)
    over = tmp_path / "full-rotary.yaml"
    over.write_text("rope: {percent: 1.0}\n")
    out = tmp_path / "hf"
    compile_checkpoint(d / "ckpt", out, CompileOptions(target="hf"), config=over)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForCausalLM"]
    names = _tensor_names(out)
    assert "model.layers.0.self_attn.q_proj.bias" in names and "model.layers.0.self_attn.o_proj.bias" not in names
    logits = _logits(_load(out), ref["tokens"])
    from mexc.backends.reference.executor import run

    oracle = run(lift(d / "ckpt", config=over), ref["tokens"])
    assert (logits - oracle[..., :V]).abs().max().item() < FP32_TOL
    assert (logits - want(ref)).abs().max().item() > 1e-3  # the override really changed the model


def test_partial_rotary_is_refused(tmp_path):
    d = megatron_checkpoint("qwen", fmt="torch")
    with pytest.raises(BackendError) as e:
        compile_checkpoint(d / "ckpt", tmp_path / "hf", CompileOptions(target="hf"))
    msg = str(e.value)
    assert "partial rotary" in msg and "qwen2" in msg and "hf target" in msg
    assert not (tmp_path / "hf").exists()


def test_bf16_output(tmp_path):
    d = megatron_checkpoint("llama", tp=2, fmt="torch")
    ref = load_reference(d)
    out = tmp_path / "hf"
    compile_checkpoint(d / "ckpt", out, CompileOptions(target="hf", dtype="bfloat16"))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16"
    h = _header(out / "model.safetensors")
    assert {v["dtype"] for k, v in h.items() if k != "__metadata__"} == {"BF16"}
    model = _load(out, dtype="auto")
    assert model.dtype == torch.bfloat16
    err = (_logits(model, ref["tokens"]) - want(ref)).abs().max().item()
    assert err < BF16_TOL, err


def test_moe_bf16_output(tmp_path):
    d = megatron_checkpoint("moe", fmt="torch")
    ref = load_reference(d)
    out = tmp_path / "hf"
    compile_checkpoint(d / "ckpt", out, CompileOptions(target="hf", dtype="bfloat16"))
    h = _header(out / "model.safetensors")
    assert h["model.layers.0.block_sparse_moe.gate.weight"]["dtype"] == "BF16"  # one dtype for the loader
    err = (_logits(_load(out, dtype="auto"), ref["tokens"]) - want(ref)).abs().max().item()
    assert err < BF16_TOL, err


def test_max_shard_size_option_shards_as_the_module_limit(tmp_path, monkeypatch):
    """HFOptions.max_shard_size (--max-shard-size) writes the same shards, byte for byte, as the module limit
    test_forced_sharding_writes_index checks."""
    import mexc.backends.hf.backend as hfb

    ck = megatron_checkpoint("llama", pp=2, fmt="torch_dist") / "ckpt"
    compile_checkpoint(ck, tmp_path / "opt", CompileOptions(target="hf", max_shard_size=40_000))
    monkeypatch.setattr(hfb, "MAX_SHARD_BYTES", 40_000)
    compile_checkpoint(ck, tmp_path / "mod", CompileOptions(target="hf"))
    files = [json.loads((tmp_path / d / "mexc-manifest.json").read_text())["files"] for d in ("opt", "mod")]
    assert len(files[0]) >= 3 and files[0] == files[1]
    assert json.loads((tmp_path / "opt" / "mexc-manifest.json").read_text())["options"]["max_shard_size"] == 40_000


def test_forced_sharding_writes_index(tmp_path, monkeypatch):
    import mexc.backends.hf.backend as hfb

    monkeypatch.setattr(hfb, "MAX_SHARD_BYTES", 40_000)
    d = megatron_checkpoint("llama", pp=2, fmt="torch_dist")
    ref = load_reference(d)
    out = tmp_path / "hf"
    res = compile_checkpoint(d / "ckpt", out, CompileOptions(target="hf"))
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3 and not (out / "model.safetensors").exists()
    n = len(shards)
    assert [s.name for s in shards] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert set(index["weight_map"]) == _tensor_names(out)
    assert index["metadata"]["total_size"] == sum(
        s.stat().st_size - 8 - struct.unpack("<Q", s.read_bytes()[:8])[0] for s in shards)
    for s in shards:  # the limit holds unless a single tensor exceeds it
        h = _header(s)
        sizes = [v["data_offsets"][1] - v["data_offsets"][0] for k, v in h.items() if k != "__metadata__"]
        assert sum(sizes) <= 40_000 or len(sizes) == 1
        assert index["weight_map"].keys() >= h.keys() - {"__metadata__"}
    assert res.emit.tensors == len(index["weight_map"])
    err = (_logits(_load(out), ref["tokens"]) - want(ref)).abs().max().item()
    assert err < FP32_TOL, err


@pytest.mark.parametrize("kind,pp,fmt", [("llama", 2, "torch_dist"), ("gpt", 2, "torch_dist")])
def test_vocab_size_trims_logits(tmp_path, kind, pp, fmt):
    d = megatron_checkpoint(kind, pp=pp, fmt=fmt)
    ref = load_reference(d)
    out = tmp_path / "hf"
    compile_checkpoint(d / "ckpt", out, CompileOptions(target="hf", vocab_size=100))
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 100
    logits = _logits(_load(out), ref["tokens"])
    assert logits.shape == (2, 8, 100)
    assert (logits - ref["logits"][..., :100]).abs().max().item() < FP32_TOL


def test_quant_and_sharding_options_are_refused(tmp_path):
    d = megatron_checkpoint("llama", pp=2, fmt="torch_dist")
    with pytest.raises(BackendError, match=r"--quant int8-wo is not supported for the hf target"):
        compile_checkpoint(d / "ckpt", tmp_path / "a", CompileOptions(target="hf", quant="int8-wo"))
    with pytest.raises(BackendError, match=r"unsharded"):
        compile_checkpoint(d / "ckpt", tmp_path / "b", CompileOptions(target="hf", tp=2))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def _legalized(kind, **fixture):
    from mexc.passes import PassManager

    d = megatron_checkpoint(kind, **fixture)
    model = lift(d / "ckpt")
    backend = get_backend("hf")
    opts = CompileOptions(target="hf")
    PassManager(backend.legalize(opts, model))(model)
    assert backend.check(model, opts) == []
    return model, backend, opts


def test_unsupported_features_give_clear_errors():
    model, backend, opts = _legalized("moe", fmt="torch")
    for n in model.graph.find("moe"):
        n.attrs["score"] = "sigmoid"
    msgs = backend.check(model, opts)
    assert any("score='sigmoid'" in m and "MixtralForCausalLM" in m for m in msgs), msgs

    model, backend, opts = _legalized("moe", fmt="torch")
    for n in model.graph.find("moe"):
        n.attrs["pre_softmax"] = True
    assert any("pre-softmax" in m for m in backend.check(model, opts))

    model, backend, opts = _legalized("llama", pp=2, fmt="torch_dist")
    next(model.graph.find("embedding")).attrs["scale"] = 8.0
    assert any("Gemma" in m and "llama family" in m for m in backend.check(model, opts))

    model, backend, opts = _legalized("llama", pp=2, fmt="torch_dist")
    from mexc.passes import PassManager, parse_pipeline

    PassManager(parse_pipeline("quantize{scheme=int8-wo}"))(model)
    assert any("quantized weights" in m for m in backend.check(model, opts))

    model, backend, opts = _legalized("gpt", pp=2, fmt="torch_dist")
    for n in model.graph.find("attention"):  # pretend GQA: GPT-2 is multi-head only
        n.attrs["num_kv_heads"] = 2
    assert any("GPT2LMHeadModel is multi-head only" in m for m in backend.check(model, opts))


def test_param_without_rule_is_never_dropped():
    from mexc.ir import Param, derive

    model, backend, opts = _legalized("moe", fmt="torch")
    attn = next(model.graph.find("attention"))
    attn.params["proj_bias"] = Param(derive("zeros", shape=(64,), dtype="f32"))
    msgs = backend.check(model, opts)
    assert any("attention biases" in m and "mixtral" in m for m in msgs), msgs


def test_name_table_describe():
    from mexc.backends.hf import RULES, describe

    text = describe()
    for fam in ("llama", "qwen2", "mixtral", "gpt2"):
        assert f"[{fam}]" in text
    assert "transformer.h.{L}.attn.c_attn.weight" in text and "conv1d" in text
    assert "block_sparse_moe.experts.{E}.w1.weight" in describe("mixtral")
    # one HF name per (family, role, params)
    keys = [(r.family, r.role, r.params) for r in RULES]
    assert len(keys) == len(set(keys))


@pytest.mark.parametrize("kind,tp,pp,fmt,store", [("llama", 2, 1, "torch", "MegatronTorchStore"),
                                                  ("moe", 1, 1, "torch", "MegatronTorchStore"),
                                                  ("gpt", 1, 2, "torch_dist", "DcpStore")])
def test_streaming_reads_each_source_tensor_once(tmp_path, monkeypatch, kind, tp, pp, fmt, store):
    """q/k/v of one fused QKV, gate/up of one fc1, the experts of one layer and a tied head share their reads."""
    from collections import Counter

    from mexc.frontends.megatron import reader

    cls = getattr(reader, store)
    reads: Counter = Counter()
    orig = cls.read

    def counting(self, key, type):
        reads[key] += 1
        return orig(self, key, type)

    monkeypatch.setattr(cls, "read", counting)
    d = megatron_checkpoint(kind, tp=tp, pp=pp, fmt=fmt)
    compile_checkpoint(d / "ckpt", tmp_path / "hf", CompileOptions(target="hf"))
    assert reads and max(reads.values()) == 1, {k: v for k, v in reads.items() if v > 1}


def test_gpt2_untied_head(tmp_path):
    """canonicalize{untie=true} keeps the same weights but writes lm_head.weight (tie_word_embeddings=false)."""
    d = megatron_checkpoint("gpt", pp=2, fmt="torch_dist")
    ref = load_reference(d)
    out = tmp_path / "hf"
    compile_checkpoint(d / "ckpt", out, CompileOptions(target="hf", pipeline="canonicalize{untie=true}"))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False and "lm_head.weight" in _tensor_names(out)
    model = _load(out)
    assert model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr()
    assert (_logits(model, ref["tokens"]) - want(ref)).abs().max().item() < FP32_TOL


def test_each_family_is_one_registered_class_in_declared_order():
    """Every HF class is one file with its rows, rules and config; a class declared before= others is tried
    first (Qwen3 before Qwen2 and Llama: a QK-norm model also has Llama's signature)."""
    from mexc.backends.hf.families import REGISTRY

    names = list(REGISTRY.classes)
    assert set(names) == {"llama", "qwen2", "qwen3", "mixtral", "gpt2", "gpt_bigcode", "gemma", "nemotron",
                          "stablelm", "falcon", "falcon2", "nemotron_h", "mistral", "ministral", "deepseek_v3",
                          "deepseek_v2", "granite", "smollm3", "qwen3_moe", "qwen2_moe", "glm4_moe", "qwen3_next",
                          "llama4", "gpt_oss", "granite_swa", "phi3"}
    for cls in REGISTRY:
        assert cls.rows and cls.rules and callable(cls.config), cls.name
        for later in cls.extra["before"]:
            assert names.index(cls.name) < names.index(later), (cls.name, later)
    text = REGISTRY["qwen3"].describe()
    assert "cannot: a LayerNorm q/k norm" in text and "self_attn.q_norm.weight" in text


def test_router_fp32_flag_follows_transformers():
    """A family keeps its router fp32 under --dtype exactly when transformers' class keeps ``gate.weight`` fp32
    (``_keep_in_fp32_modules_strict``: DeepseekV2/V3, Glm4Moe, NemotronH)."""
    transformers = pytest.importorskip("transformers")
    from mexc.backends.hf.families.common import REGISTRY

    for cls in REGISTRY:
        strict = getattr(getattr(transformers, cls.extra["architecture"]), "_keep_in_fp32_modules_strict", None)
        assert cls.extra["router_fp32"] == ("gate.weight" in (strict or [])), cls.name
