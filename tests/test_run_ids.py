"""`mexc run --prompt-ids`: greedy generation of a model trained without a tokenizer (NullTokenizer), through
transformers (hf) and onnxruntime-genai (onnx), equal to greedy decoding with the reference interpreter; the
window fixture's decode steps run past its sliding window."""

from __future__ import annotations

import pytest
import torch

from megatron_fixtures import megatron_checkpoint
from mexc.backends.base import CompileOptions
from mexc.driver import compile_checkpoint, lift
from mexc.ir.interpreter import run
from mexc.tools.cli import main

PROMPT = [1, 2, 3, 4, 5]
NEW = 8


def _greedy(model, ids, n, vocab):
    ids = list(ids)
    for _ in range(n):
        logits = run(model, torch.tensor([ids]))[0, -1, :vocab]
        ids.append(int(logits.argmax()))
    return ids


@pytest.mark.parametrize("target", ["hf", "onnx"])
def test_prompt_ids_generate_what_the_interpreter_does(tmp_path, capsys, target):
    ck = megatron_checkpoint("window") / "ckpt"
    out = tmp_path / target
    compile_checkpoint(ck, out, CompileOptions(target=target))
    model = lift(ck)
    want = _greedy(model, PROMPT, NEW, model.config.vocab_size)
    assert main(["run", str(out), "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", str(NEW)]) == 0
    assert [int(t) for t in capsys.readouterr().out.split()] == want


@pytest.mark.parametrize("ids,msg", [("1,2,100000", "outside the vocabulary"), ("a,b", "comma-separated")])
def test_bad_prompt_ids_are_usage_errors(tmp_path, capsys, ids, msg):
    out = tmp_path / "hf"
    compile_checkpoint(megatron_checkpoint("llama") / "ckpt", out, CompileOptions(target="hf"))
    try:
        rc = main(["run", str(out), "--prompt-ids", ids])
    except SystemExit as e:   # argparse's own refusal
        rc = e.code
    assert rc == 2 and msg in capsys.readouterr().err
