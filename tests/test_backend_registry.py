"""Targets through the registry (issue 15, item 5): a package adds a target with a ``mexc.backends`` entry point;
``--target`` choices, compile and ``mexc verify`` (through the backend's ``artifact_logits``) derive from it; a
plugin that shadows a built-in target or fails to register is one clear error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from megatron_fixtures import megatron_checkpoint

PLUGIN = '''
import torch
from mexc.backends.base import register_backend
from mexc.backends.hf.backend import HFBackend


class EchoHF(HFBackend):
    """The hf layout under another target name, with its own verify runtime (transformers)."""

    name = "echo-hf"

    def artifact_logits(self, out, manifest, tokens):
        from transformers import AutoModelForCausalLM

        m = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        with torch.no_grad():
            return m(tokens).logits.float(), "transformers, from the echo-hf plugin"


register_backend(EchoHF())
'''


def _site(tmp_path: Path, entries: dict[str, str], modules: dict[str, str], group: str = "mexc.backends") -> Path:
    """A directory that importlib.metadata sees as an installed distribution declaring ``entries``."""
    site = tmp_path / "site"
    info = site / "mexc_echo_plugin-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mexc-echo-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in entries.items()))
    for name, code in modules.items():
        (site / f"{name}.py").write_text(textwrap.dedent(code))
    return site


def _mexc(site: Path, *args) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", "mexc.tools.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600)


def test_plugin_target_compiles_and_verifies(tmp_path):
    site = _site(tmp_path, {"echo-hf": "echo_plugin"}, {"echo_plugin": PLUGIN})
    assert "echo-hf" in _mexc(site, "compile", "--help").stdout
    ck = megatron_checkpoint("llama") / "ckpt"
    out = tmp_path / "out"
    r = _mexc(site, "compile", ck, "--target", "echo-hf", "-o", out, "--quiet")
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "mexc-manifest.json").read_text())["target"] == "echo-hf"
    r = _mexc(site, "verify", out, "--against", ck)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "transformers, from the echo-hf plugin" in r.stdout
    assert "echo-hf: max |delta logits|" in r.stdout and r.stdout.rstrip().endswith(": OK")


SEQ_PLUGIN = '''
from dataclasses import dataclass

from mexc.backends.base import register_backend
from mexc.backends.hf.backend import HFBackend
from mexc.backends.options import HFOptions


@dataclass
class SeqOptions(HFOptions):
    max_seq_len: int = 64


class SeqHF(HFBackend):
    """The hf layout under another name, declaring one option more than hf."""

    name = "seq-hf"
    options = SeqOptions


register_backend(SeqHF())
'''


def test_builtin_backends_declare_the_options_the_cli_judges_with():
    from mexc.backends.options import BUILTIN
    from mexc.backends.registry import get_backend, options_class

    for target, cls in BUILTIN.items():
        assert get_backend(target).options is cls is options_class(target)


def test_a_plugin_declares_its_own_options(tmp_path):
    """A flag the plugin's options class has is taken for it (and still refused for hf); one it lacks is refused
    naming the targets that take it; the library's flat form builds the plugin's class."""
    site = _site(tmp_path, {"seq-hf": "seq_plugin"}, {"seq_plugin": SEQ_PLUGIN})
    ck = megatron_checkpoint("llama") / "ckpt"
    r = _mexc(site, "compile", ck, "--target", "seq-hf", "--max-seq-len", "32", "-o", tmp_path / "o", "--quiet")
    assert r.returncode == 0, r.stderr
    opts = json.loads((tmp_path / "o" / "mexc-manifest.json").read_text())["options"]
    assert opts["target"] == "seq-hf" and opts["max_seq_len"] == 32 and "max_shard_size" in opts
    r = _mexc(site, "compile", ck, "--target", "seq-hf", "--max-batch-size", "2", "-o", tmp_path / "p")
    assert r.returncode == 2 and r.stderr.splitlines() == [
        "error: --max-batch-size does nothing for --target seq-hf",
        "hint: it applies to --target trtllm / tensorrt; drop it"], r.stderr
    r = _mexc(site, "compile", ck, "--target", "hf", "--max-seq-len", "32", "-o", tmp_path / "q")
    assert r.returncode == 2 and "hint: it applies to --target trtllm / onnx / tensorrt / seq-hf; drop it" not in \
        r.stderr and "--max-seq-len does nothing for --target hf" in r.stderr
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
    code = ("from mexc.backends.options import CompileOptions; "
            "o = CompileOptions(target='seq-hf', max_seq_len=16); print(type(o).__name__, o.max_seq_len)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert r.stdout.split() == ["SeqOptions", "16"], r.stderr
    assert not (tmp_path / "p").exists() and not (tmp_path / "q").exists()


@pytest.mark.parametrize("entries,modules,msg", [
    ({"hf": "echo_plugin"}, {"echo_plugin": "X = 1\n"}, "shadows the built-in target 'hf'"),
    ({"silent": "silent_plugin"}, {"silent_plugin": "X = 1\n"}, "did not register target 'silent'"),
    ({"broken": "broken_plugin"}, {"broken_plugin": "import not_a_module_anywhere\n"}, "cannot be loaded"),
    ({"boom": "boom_plugin"}, {"boom_plugin": "raise RuntimeError('plugin exploded')\n"},
     "entry point boom = boom_plugin (mexc.backends) failed on import (RuntimeError: plugin exploded)"),
    ({"badopts": "badopts_plugin"}, {"badopts_plugin": "from mexc.backends.base import Backend, register_backend\n"
                                     "class B(Backend):\n    name = 'badopts'\n    options = dict\n"
                                     "register_backend(B())\n"}, "the badopts backend declares options="),
])
def test_bad_plugins_are_one_clear_error(tmp_path, entries, modules, msg):
    site = _site(tmp_path, entries, modules)
    target = next(iter(entries))
    r = _mexc(site, "compile", megatron_checkpoint("llama") / "ckpt", "--target", target, "-o", tmp_path / "o")
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and msg in lines[0] and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "o").exists()
