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


@pytest.mark.parametrize("entries,modules,msg", [
    ({"hf": "echo_plugin"}, {"echo_plugin": "X = 1\n"}, "shadows the built-in target 'hf'"),
    ({"silent": "silent_plugin"}, {"silent_plugin": "X = 1\n"}, "did not register target 'silent'"),
    ({"broken": "broken_plugin"}, {"broken_plugin": "import not_a_module_anywhere\n"}, "cannot be loaded"),
    ({"boom": "boom_plugin"}, {"boom_plugin": "raise RuntimeError('plugin exploded')\n"},
     "entry point boom = boom_plugin (mexc.backends) failed on import (RuntimeError: plugin exploded)"),
])
def test_bad_plugins_are_one_clear_error(tmp_path, entries, modules, msg):
    site = _site(tmp_path, entries, modules)
    target = next(iter(entries))
    r = _mexc(site, "compile", megatron_checkpoint("llama") / "ckpt", "--target", target, "-o", tmp_path / "o")
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and msg in lines[0] and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "o").exists()
