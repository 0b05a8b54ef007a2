"""A non-editable install carries every module under the `mexc.` import path, and its console script works."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_pip_install_non_editable(tmp_path):
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--target", str(target), str(ROOT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    code = ("import mexc, mexc.ir, mexc.passes, mexc.frontends.megatron, mexc.frontends.trtllm, "
            "mexc.backends.trtllm, mexc.backends.hf, mexc.backends.onnx, mexc.backends.reference.executor; "
            "print(mexc.__file__)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                       env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(target / "mexc" / "__init__.py")
    assert not (target / "mexc" / "tests").exists()
    r = subprocess.run([sys.executable, "-m", "mexc.tools.cli", "passes"], capture_output=True, text=True,
                       cwd=tmp_path, env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0 and "reshard" in r.stdout
    eps = list((target).glob("mexc-*.dist-info/entry_points.txt"))
    assert eps and "mexc = mexc.tools.cli:main" in eps[0].read_text()


def test_every_package_of_the_tree_is_listed():
    """pyproject lists its packages by hand: a new package directory (a target-class folder) must be in it, or a
    plain `pip install` ships a mexc that cannot import itself."""
    import tomllib

    root = Path(__file__).resolve().parent.parent
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    skip = {"tests", "build", ".venv", ".git", "examples", "docs", "out"}
    found = set()
    for init in root.rglob("__init__.py"):
        rel = init.parent.relative_to(root).as_posix()
        if any(rel == s or rel.startswith(s + "/") for s in skip):
            continue
        found.add("mexc" if rel == "." else "mexc." + rel.replace("/", "."))
    assert found <= listed, f"packages missing from pyproject.toml: {sorted(found - listed)}"


def test_extras_pin_the_tool_versions_the_docs_state():
    """The `trtllm` extra installs only a TensorRT-LLM that still has the checkpoint / trtllm-build flow mexc
    writes for (<= 1.2.x, docs/targets.md); `tensorrt` one whose ONNX parser imports the ops the tensorrt
    profile uses (>= 10.15, docs/onnx.md)."""
    import tomllib

    from packaging.requirements import Requirement

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    trtllm = Requirement(extras["trtllm"][0])
    assert trtllm.name == "tensorrt-llm"
    assert all(trtllm.specifier.contains(v) for v in ("0.15.0", "1.0.0", "1.2.0", "1.2.1"))
    assert not any(trtllm.specifier.contains(v) for v in ("0.14.0", "1.3.0", "1.3.0rc1", "2.0.0"))
    assert "**up to 1.2.x**" in (ROOT / "docs" / "targets.md").read_text()
    tensorrt = Requirement(extras["tensorrt"][0])
    assert tensorrt.specifier.contains("10.15.1") and not tensorrt.specifier.contains("10.13.0")
