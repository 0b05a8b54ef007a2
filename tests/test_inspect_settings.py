"""`mexc inspect` shows what changes the math beyond the sizes (every attribute off its declared default, with the
layers that have it) and the class each target would write, from each target's own legalization and check."""

from __future__ import annotations

import json

import pytest

from megatron_fixtures import megatron_checkpoint
from mexc.tools.cli import main


@pytest.mark.parametrize("kind,lines", [
    ("window", ["attention:  window=3 (all)", "targets:    hf mistral, trtllm refused, onnx decoder"]),
    ("qwen2-moe", ["moe:        pre_softmax=True (all); shared_expert=sigmoid-gated (all)",
                   "targets:    hf qwen2_moe, trtllm QWenForCausalLM, onnx decoder"]),
    ("nope", ["attention:  position=none (layers 1)", "targets:    hf smollm3, trtllm refused, onnx decoder"]),
])
def test_inspect_names_settings_and_target_classes(kind, lines, capsys):
    ck = megatron_checkpoint(kind) / "ckpt"
    assert main(["inspect", str(ck)]) == 0
    out = capsys.readouterr().out.splitlines()
    for line in lines:
        assert line in out, "\n".join(out)
    assert main(["inspect", str(ck), "--json"]) == 0
    js = json.loads(capsys.readouterr().out)
    assert js["targets"]["onnx"] == "decoder" and set(js["settings"]) <= {"attention", "mlp", "moe", "norm", "mla"}
