"""`mexc verify` streams layer by layer (issue 19 item 9, issue 21 item 3): tools/verify_stream.py.

Oracles: the whole-model path of the reference interpreter (``run``, every weight held until the end) gives
the same logits bit for bit; megatron-core's own logits of its fixture; transformers' whole-model
``from_pretrained`` for the hf runner; tracemalloc counts the bytes of weights held at once (the test's store
keeps each tensor in a Python ``bytearray``, which tracemalloc traces; torch's own allocations it does not).
"""

import json
import shutil
import struct
import sys
import tracemalloc
import zlib
from pathlib import Path

import pytest
import torch
import xxhash

from megatron_fixtures import load_reference, megatron_checkpoint
from tiny_models import random_llama
from mexc import ir
from mexc.ir.interpreter import run
from mexc.driver import lift
from mexc.frontends.trtllm import lift_trtllm
from mexc.tools.cli import main
from mexc.tools.verify import PROMPTS
from mexc.tools.verify_stream import _streaming_model, hf_logits, stream_logits

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "llama-tiny"
TOKENS = PROMPTS.clamp(max=99)  # the example's vocabulary: 100 tokens


def compile_(src, out, *args):
    assert main(["compile", str(src), "-o", str(out), "--quiet", *map(str, args)]) == 0
    return out


@pytest.fixture(scope="module")
def outs(tmp_path_factory):
    base = tmp_path_factory.mktemp("vstream")
    return {"trtllm": compile_(EXAMPLE, base / "trtllm", "--target", "trtllm", "--tp", 2),
            "hf": compile_(EXAMPLE, base / "hf", "--target", "hf"),
            "hf-bf16": compile_(EXAMPLE, base / "hf-bf16", "--target", "hf", "--dtype", "bfloat16")}


def test_streamed_logits_equal_the_whole_model_path_on_llama_tiny(outs):
    src = lift(EXAMPLE)  # TP=2 megatron-core save: ranks simulated on both paths
    assert torch.equal(stream_logits(src, TOKENS), run(src, TOKENS))
    out = lift_trtllm(outs["trtllm"])
    streamed = stream_logits(out, TOKENS)
    assert torch.equal(streamed, run(out, TOKENS))
    assert (streamed[..., :100] - run(src, TOKENS)[..., :100]).abs().max() < 1e-5


def test_streamed_logits_equal_the_whole_model_path_on_a_megatron_core_fixture():
    d = megatron_checkpoint("llama", tp=2, pp=2, fmt="torch_dist")
    ref = load_reference(d)
    src = lift(d / "ckpt")
    streamed = stream_logits(src, ref["tokens"])
    assert torch.equal(streamed, run(src, ref["tokens"]))
    v = ref["logits"].shape[-1]
    assert (streamed[..., :v] - ref["logits"].float()).abs().max() < 1e-3  # megatron-core's own forward


# ------------------------------------------------------------------------------------------ bounded


class HeapStore(ir.Store):
    """Seeded weights, each in its own ``bytearray`` (traced by tracemalloc) while a tensor uses it."""

    kind = "heap-test"

    def read(self, key, type):
        g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
        buf = bytearray(4 * torch.Size(type.shape).numel())
        t = torch.frombuffer(buf, dtype=torch.float32).view(type.shape)
        t.copy_(torch.randn(type.shape, generator=g) * 0.05 + (1.0 if key.endswith("norm") else 0.0))
        return t


def deep_model(layers=24, hidden=64, ffn=256, heads=4, kv=2, vocab=64):
    return random_llama(hidden=hidden, layers=layers, vocab=vocab, ffn=ffn, heads=heads, kv=kv,
                        store=HeapStore("heap"))


def layer_bytes(model, layer):
    return sum(4 * torch.Size(p.type.shape).numel() for n in model.graph.nodes if n.layer == layer
               for p in n.params.values())


def traced_peak(fn):
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        out = fn()
        return out, tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def test_streaming_holds_about_one_layer_of_weights_whatever_the_depth():
    model = deep_model()
    tokens = PROMPTS.clamp(max=63)
    one = layer_bytes(model, 0)
    held = []  # traced bytes still alive after each node: nothing of a finished node may stay

    def after(node):
        held.append(tracemalloc.get_traced_memory()[0])

    streamed, peak = traced_peak(lambda: stream_logits(model, tokens, on_node=after))
    whole, whole_peak = traced_peak(lambda: run(model, tokens))
    assert torch.equal(streamed, whole)
    assert whole_peak > 20 * one  # the measurement sees weights: the whole-model path holds all 24 layers
    assert peak < 2 * one, (peak, one)
    # nothing of a finished node stays: keeping even one q/k/v matrix per layer would add 24 x 32 KB; what
    # does grow is metadata (recipe keys computed once, torch's dispatch caches): tens of KB in all
    assert max(held) - min(held) < one, held


# --------------------------------------------------------------------------------------------- hf


@pytest.mark.parametrize("kind,stored", [("hf", torch.float32), ("hf-bf16", torch.bfloat16)])
def test_hf_streamed_through_transformers_equals_its_whole_model_load(outs, kind, stored):
    from transformers import AutoModelForCausalLM

    streamed, how = hf_logits(outs[kind], TOKENS, stored)
    assert f"weights {str(stored)[6:]} as stored, upcast to float32 one module at a time" in how
    whole = AutoModelForCausalLM.from_pretrained(outs[kind], dtype=torch.float32)  # transformers' own load
    with torch.no_grad():
        assert torch.equal(streamed, whole(TOKENS).logits)
    in_stored, how_whole = hf_logits(outs[kind], TOKENS, stored, stream=False)
    assert "whole model in memory" in how_whole and str(stored)[6:] in how_whole
    assert (in_stored - streamed).abs().max() < (1e-6 if stored == torch.float32 else 0.05)


def test_hf_streams_a_family_with_computed_buffers_in_a_weighted_module(tmp_path):
    """Gemma's embedding module holds a computed ``embed_scale`` buffer beside its weight: the buffer is
    computed on the CPU while the weight stays on meta until its forward."""
    from transformers import AutoModelForCausalLM

    d = megatron_checkpoint("gemma", tp=1, pp=1, fmt="torch")
    out = compile_(d / "ckpt", tmp_path / "gemma-hf", "--target", "hf")
    streamed, how = hf_logits(out, TOKENS.clamp(max=127), torch.float32)
    assert "one module's weights in memory at a time" in how
    with torch.no_grad():
        whole = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(TOKENS.clamp(max=127)).logits
    assert torch.equal(streamed, whole)
    ref = load_reference(d)
    got, _ = hf_logits(out, ref["tokens"], torch.float32)
    v = got.shape[-1]   # Megatron's padding rows are trimmed (the saved args' vocab)
    assert (got - ref["logits"][..., :v].float()).abs().max() < 1e-3  # megatron-core


def test_hf_streaming_holds_one_module_at_a_time(outs):
    model = _streaming_model(outs["hf"], torch.float32)
    sizes = {n: sum(p.numel() for p in m.parameters(recurse=False))
             for n, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))}
    seen = []

    def count(mod, args):  # registered after verify_stream's own pre-hook: this module's weights are loaded
        seen.append(sum(p.numel() for p in model.parameters() if not p.is_meta))
        assert seen[-1] == sizes[mod._mexc_prefix.rstrip(".")]

    for n, m in model.named_modules():
        if n in sizes:
            m.register_forward_pre_hook(count)
    with torch.no_grad():
        model(TOKENS, use_cache=False)
    assert len(seen) == len(sizes) and max(seen) == max(sizes.values())
    assert all(p.is_meta for p in model.parameters())  # everything given back after the forward


def test_hf_family_with_converted_parameters_loads_whole_and_says_so(tmp_path, capsys):
    d = megatron_checkpoint("moe", tp=1, pp=1, fmt="torch")  # Mixtral: transformers fuses the expert tensors
    out = compile_(d / "ckpt", tmp_path / "moe-hf", "--target", "hf")
    capsys.readouterr()
    assert main(["verify", str(out), "--against", str(d / "ckpt")]) == 0
    text = capsys.readouterr().out
    assert "whole model in memory (its parameters are not the files' tensors one to one)" in text, text


# ----------------------------------------------------------------------------------- corruption


def st_region(path: Path, tensor: str):
    """(absolute offset, length, dtype) of ``tensor`` in a safetensors file, from its header."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        h = json.loads(f.read(n))[tensor]
    b, e = h["data_offsets"]
    return 8 + n + b, e - b, h["dtype"]


def corrupt_consistently(out: Path, file: str, tensor: str):
    """Scale a layer weight by 3 and record its new checksum in the manifest: the artifact checks pass (as
    for a wrong conversion written faithfully); only the logits can catch it."""
    path = out / file
    off, length, dtype = st_region(path, tensor)
    assert dtype == "F32"
    with open(path, "r+b") as f:
        f.seek(off)
        t = torch.frombuffer(bytearray(f.read(length)), dtype=torch.float32) * 3
        f.seek(off)
        f.write(t.numpy().tobytes())
    mf = out / "mexc-manifest.json"
    m = json.loads(mf.read_text())
    m["files"][file][tensor] = xxhash.xxh3_128_hexdigest(t.numpy().tobytes())
    mf.write_text(json.dumps(m))


@pytest.mark.parametrize("kind,file,tensor", [
    ("trtllm", "rank1.safetensors", "transformer.layers.1.mlp.proj.weight"),
    ("hf", "model.safetensors", "model.layers.1.mlp.down_proj.weight")])
def test_a_corrupted_layer_weight_still_fails(outs, tmp_path, capsys, kind, file, tensor):
    capsys.readouterr()
    assert main(["verify", str(outs[kind]), "--against", str(EXAMPLE)]) == 0  # the untouched output
    assert "OK" in capsys.readouterr().out
    bad = tmp_path / kind
    shutil.copytree(outs[kind], bad)
    corrupt_consistently(bad, file, tensor)
    assert main(["verify", str(bad), "--against", str(EXAMPLE)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert any(ln.startswith("artifact:") and ln.endswith("NaN/Inf: OK") for ln in lines), lines
    assert lines[-1].startswith(f"{kind}: max |delta logits|") and lines[-1].endswith("FAIL"), lines


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
