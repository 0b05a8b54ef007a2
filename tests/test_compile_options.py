"""Per-target option dataclasses (issue 15, item 5): each target's class holds only what it reads, the
``CompileOptions(target=..., ...)`` form library callers use builds that class, and a field another target reads
is refused in one line, as the CLI refuses the flag (tools/compile_flags.py)."""

from __future__ import annotations

import dataclasses
import pickle

import pytest

from mexc.backends.options import (BUILTIN, CompileOptions, HFOptions, OnnxOptions, TensorRTOptions, TrtllmOptions,
                                   for_target, option_fields)
from mexc.errors import UsageError


def test_each_target_class_holds_only_what_its_backend_reads():
    assert option_fields(TrtllmOptions) == ("max_batch_size", "max_input_len", "max_seq_len", "parallel_embedding")
    assert option_fields(OnnxOptions) == ("profile", "max_seq_len", "accuracy_level", "quant_lm_head")
    assert option_fields(TensorRTOptions) == ("profile", "max_batch_size", "max_input_len", "max_seq_len",
                                              "quant_lm_head")
    assert option_fields(HFOptions) == ("max_shard_size",)
    assert set(BUILTIN) == {"trtllm", "hf", "onnx", "tensorrt"}
    for target, cls in BUILTIN.items():
        assert cls().target == target and issubclass(cls, CompileOptions)


@pytest.mark.parametrize("kw,cls", [
    ({"target": "onnx", "profile": "tensorrt", "build": "never"}, OnnxOptions),
    ({"target": "tensorrt", "max_batch_size": 2}, TensorRTOptions),
    ({"target": "hf", "dtype": "bfloat16"}, HFOptions),
    ({"target": "trtllm", "tp": 2, "max_seq_len": 512}, TrtllmOptions),
    ({"tp": 2}, TrtllmOptions),   # the default target, as before
])
def test_the_flat_form_builds_the_target_class(kw, cls):
    o = CompileOptions(**kw)
    assert type(o) is cls and all(getattr(o, k) == v for k, v in kw.items())
    assert dataclasses.replace(o, tp=4).tp == 4 and type(dataclasses.replace(o)) is cls
    assert pickle.loads(pickle.dumps(o)) == o


@pytest.mark.parametrize("kw,flag", [
    ({"target": "hf", "max_seq_len": 64}, "--max-seq-len"),
    ({"target": "onnx", "max_input_len": 16}, "--max-input-len"),
    ({"target": "trtllm", "profile": "ort"}, "--profile"),
    ({"target": "tensorrt", "accuracy_level": 0}, "--accuracy-level"),
])
def test_a_field_the_target_does_not_read_is_refused(kw, flag):
    with pytest.raises(UsageError, match=f"^{flag}: not an option of --target {kw['target']} "):
        CompileOptions(**kw)


def test_the_bare_common_part_gets_the_target_defaults():
    bare = CompileOptions()
    assert type(bare) is CompileOptions and pickle.loads(pickle.dumps(bare)) == bare
    bare.target, bare.dtype = "onnx", "float16"
    o = for_target(bare)
    assert type(o) is OnnxOptions and o.dtype == "float16" and o.profile == "ort" and o.max_seq_len == 2048
    t = TrtllmOptions(max_seq_len=128)
    assert for_target(t) is t
    with pytest.raises(UsageError, match="TrtllmOptions holds the options of another target than --target hf"):
        for_target(TrtllmOptions(target="hf"))


@pytest.mark.parametrize("o,msg", [
    (TrtllmOptions(max_input_len=0), "--max-input-len must be a positive integer"),
    (OnnxOptions(profile="cuda"), "--profile must be ort or tensorrt"),
    (OnnxOptions(accuracy_level=7), "--accuracy-level must be 0-4"),
    (TensorRTOptions(profile="ort"), "--profile ort contradicts it"),
    (HFOptions(max_shard_size=0), "--max-shard-size must be a positive integer"),
    (HFOptions(jobs=0), "--jobs must be a positive integer"),
])
def test_each_class_validates_its_own_fields(o, msg):
    with pytest.raises(UsageError, match=msg):
        o.validate()
    dataclasses.replace(o, **{f.name: f.default for f in dataclasses.fields(o) if f.name != "target"}).validate()
