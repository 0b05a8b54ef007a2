"""Frontends through the registry (issue 15, item 5): a package adds a checkpoint format with a
``mexc.frontends`` entry point; ``mexc compile`` asks it before the Megatron frontend. The plugin here reads a
Hugging Face Llama directory (tests/tiny_models.llama_ir); its trtllm output must reproduce transformers'
logits through the test-side TensorRT-LLM reader. A plugin that fails is one clear error."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_backend_registry import _site

TESTS = Path(__file__).resolve().parent

PLUGIN = '''
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, {tests!r})
import tiny_models


class HFLlama:
    name = "hf-llama"

    def detect(self, path):
        cfg = Path(path) / "config.json"
        return cfg.is_file() and "LlamaForCausalLM" in json.loads(cfg.read_text()).get("architectures", [])

    def lift(self, path, *, iteration=None, config=None, overrides=None):
        from transformers import AutoModelForCausalLM

        m = AutoModelForCausalLM.from_pretrained(path)
        return tiny_models.llama_ir(m, Path(tempfile.mkdtemp(prefix="hf-llama-")))


FRONTEND = HFLlama()
'''


def _mexc(site: Path, *args) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", "mexc.tools.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600)


def test_plugin_frontend_reads_its_format(tmp_path):
    import tiny_models
    import trtllm_reader

    hf = tiny_models.hf_llama(seed=3)
    src = tmp_path / "hf-src"
    hf.save_pretrained(src)
    site = _site(tmp_path, {"hf-llama": "hf_llama_frontend:FRONTEND"},
                 {"hf_llama_frontend": PLUGIN.format(tests=str(TESTS))}, group="mexc.frontends")
    out = tmp_path / "trt"
    r = _mexc(site, "compile", src, "--target", "trtllm", "-o", out, "--quiet")
    assert r.returncode == 0, r.stderr
    tokens = torch.randint(0, hf.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = hf(tokens).logits
    got = trtllm_reader.logits(str(out), tokens)
    assert (got - want).abs().max().item() < 1e-4
    # the built-in frontend still reads Megatron saves when a plugin is installed
    from megatron_fixtures import megatron_checkpoint

    r = _mexc(site, "compile", megatron_checkpoint("llama") / "ckpt", "--target", "hf", "-o", tmp_path / "m", "--quiet")
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("value,code,msg", [
    ("broken_fe:FRONTEND", "import not_a_module_anywhere\n", "failed to load"),
    ("broken_fe:FRONTEND", "FRONTEND = object()\n", "has no detect() and lift()"),
    ("broken_fe:FRONTEND", "class F:\n    def detect(self, p): raise OSError('disk')\n    def lift(self, p, **k): pass\n"
                           "FRONTEND = F()\n", "failed to inspect it"),
])
def test_broken_frontend_plugins_are_one_clear_error(tmp_path, value, code, msg):
    site = _site(tmp_path, {"broken": value}, {"broken_fe": code}, group="mexc.frontends")
    (tmp_path / "ckpt").mkdir()
    r = _mexc(site, "compile", tmp_path / "ckpt", "--target", "hf", "-o", tmp_path / "o")
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and lines[0].startswith("error: ") and msg in lines[0], r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "o").exists()
