"""Output safety (issue 14, deliver 3; issue 19, item 4): the temporary output is private until complete, files
are never written through a planted link, -o inside the checkpoint and --force on anything but an earlier mexc
output are refused, the --force swap is atomic (or recoverable, with a true message), SIGHUP/SIGINT/SIGTERM and
kill -9 leave nothing that the next run does not clean, and long legal names work.

The input is the bundled example checkpoint examples/llama-tiny (a real megatron-core save, TP=2)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

import mexc.backends.outfile as outfile
import mexc.backends.output as output
from mexc.backends.base import INTERRUPTED, CompileOptions
from mexc.driver import compile_checkpoint, get_backend
from mexc.errors import UsageError
from mexc.tools.cli import main

ROOT = Path(__file__).resolve().parent.parent
CKPT = ROOT / "examples" / "llama-tiny"


def _mexc(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "mexc.tools.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd)


def _one_error(err: str, *needles: str) -> None:
    assert "Traceback" not in err, err
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1, err
    for n in needles:
        assert n in err, (n, err)


def _tree(d: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``d`` (what must stay untouched)."""
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*"))
            if p.is_file()}


def _compile(out: Path, target: str = "hf", **kw) -> None:
    compile_checkpoint(CKPT, out, CompileOptions(target=target, **kw))


@pytest.fixture(autouse=True)
def _keep_signal_handlers():
    """main() installs handlers for the process (and an interrupt sets the writers' stop flag): give the next
    test what this one found."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)
    INTERRUPTED.clear()


@pytest.fixture(scope="module")
def earlier(tmp_path_factory) -> Path:
    """An earlier mexc output (hf), copied by the tests that replace one."""
    out = tmp_path_factory.mktemp("earlier") / "hf"
    _compile(out)
    return out


def _copy_earlier(earlier: Path, dst: Path) -> Path:
    shutil.copytree(earlier, dst)
    return dst


# ------------------------------------------------------------------------------------ private, no links


def test_temporary_directory_is_private_while_files_are_written(tmp_path, monkeypatch):
    seen = []

    def watching(real):
        def open_new(path):
            st = os.lstat(Path(path).parent)
            seen.append((Path(path).name, stat.S_IMODE(st.st_mode), Path(path).parent.name))
            return real(path)
        return open_new

    monkeypatch.setattr(output, "open_new", watching(output.open_new))     # config, manifest (write_new)
    monkeypatch.setattr(outfile, "open_new", watching(outfile.open_new))   # weights (OutputFile)
    old = os.umask(0o002)   # group-writable: the temporary directory must not be
    try:
        out = tmp_path / "o"
        _compile(out)
    finally:
        os.umask(old)
    names = {n for n, _, _ in seen}
    assert {"config.json", "model.safetensors", "mexc-manifest.json"} <= names
    assert all(mode == 0o700 for _, mode, _ in seen), seen
    assert all(".mexc-tmp-" in d for _, _, d in seen)
    # complete: the umask's modes, shared with serving containers
    assert stat.S_IMODE(out.stat().st_mode) == 0o775
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o664}
    assert [p.name for p in tmp_path.iterdir()] == ["o"]


@pytest.mark.parametrize("target,name", [("hf", "config.json"), ("hf", "model.safetensors"),
                                         ("hf", "mexc-manifest.json"), ("onnx", "model.onnx"),
                                         ("onnx", "model.onnx.data"), ("onnx", "genai_config.json"),
                                         ("trtllm", "config.json"), ("trtllm", "rank0.safetensors")])
def test_a_link_planted_in_the_temporary_directory_is_refused(tmp_path, monkeypatch, capsys, target, name):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    dangling = tmp_path / "nowhere.txt"
    backend = get_backend(target)
    real = type(backend).emit

    def planting(self, model, tmp, opts, progress=None):
        os.symlink(victim if name != "mexc-manifest.json" else dangling, Path(tmp) / name)
        return real(self, model, tmp, opts, progress=progress)

    monkeypatch.setattr(type(backend), "emit", planting)
    parent = tmp_path / "outs"
    parent.mkdir()
    rc = main(["compile", str(CKPT), "--target", target, "-o", str(parent / "o"), "--quiet"])
    assert rc != 0
    _one_error(capsys.readouterr().err, f"{name}: something is already there", "symbolic link")
    assert victim.read_text() == "precious\n" and not dangling.exists()
    assert list(parent.iterdir()) == []


def test_an_output_that_is_a_link_is_never_replaced(tmp_path, earlier):
    real = _copy_earlier(earlier, tmp_path / "real")
    before = _tree(real)
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(UsageError, match="is a symbolic link"):
        _compile(tmp_path / "link", force=True)
    assert _tree(real) == before and (tmp_path / "link").is_symlink()


# ------------------------------------------------------------------------------------ what -o may be


def test_output_inside_the_checkpoint_is_refused(tmp_path):
    ck = tmp_path / "ckpt"
    shutil.copytree(CKPT, ck)
    before = _tree(ck)
    (tmp_path / "alias").symlink_to(ck / "iter_0000010")   # the same place by another path
    for out in (ck / "iter_0000010" / "mp_rank_01", ck / "iter_0000010" / "new", tmp_path / "alias" / "new"):
        r = _mexc("compile", ck, "--target", "hf", "-o", out, "--force")
        assert r.returncode != 0
        _one_error(r.stderr, "is inside the checkpoint")
    for out in (ck, tmp_path):
        r = _mexc("compile", ck, "--target", "hf", "-o", out, "--force")
        _one_error(r.stderr, "is the checkpoint or contains it")
    assert _tree(ck) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alias", "ckpt"]


def test_force_replaces_only_an_earlier_mexc_output(tmp_path, earlier, capsys):
    user = tmp_path / "tokenizer"
    user.mkdir()
    (user / "tokenizer.json").write_text("{}")
    (user / "notes.txt").write_text("mine")
    fake = _copy_earlier(earlier, tmp_path / "fake")     # a manifest, but not one mexc wrote
    (fake / "mexc-manifest.json").write_text(json.dumps({"producer": "someone else"}))
    linked = tmp_path / "linked"                          # a manifest that is a link to a real one
    linked.mkdir()
    (linked / "mexc-manifest.json").symlink_to(earlier / "mexc-manifest.json")
    for d in (user, fake, linked):
        before = _tree(d)
        rc = main(["compile", str(CKPT), "--target", "hf", "-o", str(d), "--force", "--quiet"])
        assert rc == 2
        _one_error(capsys.readouterr().err, f"{d}: is not a mexc output", "--force replaces only")
        assert _tree(d) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fake", "linked", "tokenizer"]


def test_force_on_the_current_directory_is_a_clear_error(tmp_path, earlier):
    out = _copy_earlier(earlier, tmp_path / "o")
    before = _tree(out)
    r = _mexc("compile", CKPT, "--target", "hf", "-o", ".", "--force", cwd=out)
    assert r.returncode == 2
    _one_error(r.stderr, "is the current directory")
    assert "busy" not in r.stderr
    assert _tree(out) == before and [p.name for p in tmp_path.iterdir()] == ["o"]


# ------------------------------------------------------------------------------------ the swap


def _spy_renameat2(monkeypatch, supported=True):
    calls = []
    real = output.renameat2

    def spy(src, dst, flags):
        calls.append(flags)
        return real(src, dst, flags) if supported else False

    monkeypatch.setattr(output, "renameat2", spy)
    return calls


@pytest.mark.parametrize("exchange", [True, False])
def test_force_swap_leaves_exactly_the_new_output(tmp_path, earlier, monkeypatch, exchange):
    out = _copy_earlier(earlier, tmp_path / "o")
    calls = _spy_renameat2(monkeypatch, supported=exchange)
    notes: list[str] = []
    compile_checkpoint(CKPT, out, CompileOptions(target="onnx", force=True), log=notes.append)
    assert output.RENAME_EXCHANGE in calls
    assert (out / "model.onnx").is_file() and not (out / "model.safetensors").exists()
    assert json.loads((out / "mexc-manifest.json").read_text())["target"] == "onnx"
    assert [p.name for p in tmp_path.iterdir()] == ["o"] and not [n for n in notes if "removed" in n]


@pytest.mark.parametrize("restore_fails", [False, True])
def test_recoverable_swap_keeps_or_names_the_previous_output(tmp_path, earlier, monkeypatch, capsys,
                                                             restore_fails):
    """Without RENAME_EXCHANGE the old output is moved aside first; when the new one cannot follow, the old one
    goes back, or the error says where it is."""
    out = _copy_earlier(earlier, tmp_path / "o")
    before = _tree(out)
    _spy_renameat2(monkeypatch, supported=False)
    real_rename = os.rename

    def rename(src, dst):
        if ".mexc-tmp-" in Path(src).name or (restore_fails and Path(src).name == "prev"):
            raise OSError(errno.EIO, "Input/output error")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    rc = main(["compile", str(CKPT), "--target", "onnx", "-o", str(out), "--force", "--quiet"])
    err = capsys.readouterr().err
    monkeypatch.setattr(os, "rename", real_rename)
    assert rc != 0
    if not restore_fails:
        _one_error(err, "writing failed", "the previous output is unchanged")
        assert _tree(out) == before and [p.name for p in tmp_path.iterdir()] == ["o"]
        return
    _one_error(err, "replacing it failed", "the previous output is at", "mv ")
    prev = Path(err.split("the previous output is at ")[1].split("\n")[0])
    assert not out.exists() and _tree(prev) == before
    # the next run into the same parent puts it back (its process is gone: here, it is this one; fake that)
    monkeypatch.setattr(output, "_process_gone", lambda pid: True)
    notes = output.clean_leftovers(tmp_path)
    assert any("put back the previous output" in n for n in notes)
    assert _tree(out) == before and [p.name for p in tmp_path.iterdir()] == ["o"]


def test_a_signal_during_the_swap_waits_for_it(tmp_path, earlier, monkeypatch, capsys):
    """SIGINT arriving between the start and the end of the swap is delivered after it: the message says the
    output is complete, and it is."""
    out = _copy_earlier(earlier, tmp_path / "o")
    real = output.renameat2

    def interrupted(src, dst, flags):
        os.kill(os.getpid(), signal.SIGINT)
        return real(src, dst, flags)

    monkeypatch.setattr(output, "renameat2", interrupted)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    rc = main(["compile", str(CKPT), "--target", "onnx", "-o", str(out), "--force", "--quiet"])
    assert rc == 130
    _one_error(capsys.readouterr().err, "written in full")
    assert json.loads((out / "mexc-manifest.json").read_text())["target"] == "onnx"
    assert [p.name for p in tmp_path.iterdir()] == ["o"]


def test_a_signal_after_the_swap_names_the_complete_output(tmp_path, monkeypatch, capsys):
    """SIGINT while the command finishes (its summary), after the output was swapped in: the message must not
    claim that nothing was left behind; the output stays, complete."""
    from mexc.backends import serve

    out = tmp_path / "o"

    def interrupted(path):
        os.kill(os.getpid(), signal.SIGINT)
        return []

    monkeypatch.setattr(serve, "serve_commands", interrupted)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    rc = main(["compile", str(CKPT), "--target", "onnx", "-o", str(out), "--quiet", "--json"])
    assert rc == 130
    _one_error(capsys.readouterr().err, f"interrupted after {out} was written in full")
    assert json.loads((out / "mexc-manifest.json").read_text())["target"] == "onnx"
    assert [p.name for p in tmp_path.iterdir()] == ["o"]


# ------------------------------------------------------------------------------------ signals, leftovers

# A compile whose weight writer stops after its first block and waits (so a signal surely lands mid-write);
# SIGINT and SIGHUP get their default dispositions, as in an interactive shell.
_SLOW = """
import os, signal, sys, time
from pathlib import Path
signal.signal(signal.SIGINT, signal.default_int_handler)
signal.signal(signal.SIGHUP, signal.SIG_DFL)
import mexc.backends.outfile as of
real = of.OutputFile.write
def write(self, data, h=None):
    real(self, data, h)
    Path(sys.argv[1]).touch()
    while True:
        time.sleep(0.05)
of.OutputFile.write = write
from mexc.tools.cli import main
sys.exit(main(["compile", sys.argv[2], "--target", "hf", "-o", sys.argv[3]]))
"""


def _start_slow(tmp_path: Path, out: Path) -> subprocess.Popen:
    ready = tmp_path / "ready"
    p = subprocess.Popen([sys.executable, "-c", _SLOW, str(ready), str(CKPT), str(out)], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300   # a hang guard, not a measurement
    while not ready.exists():
        if p.poll() is not None or time.monotonic() > deadline:
            p.kill()
            raise AssertionError(f"the compile did not start writing: {p.communicate()[1]}")
        time.sleep(0.05)
    return p


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGINT, signal.SIGTERM])
def test_signal_mid_write_leaves_nothing(tmp_path, sig):
    parent = tmp_path / "outs"
    parent.mkdir()
    p = _start_slow(tmp_path, parent / "o")
    assert [n.name for n in parent.iterdir() if ".mexc-tmp-" in n.name]   # it was writing
    p.send_signal(sig)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 130
    _one_error(err, "interrupted; nothing was left behind")
    assert list(parent.iterdir()) == []


def test_a_killed_runs_leftovers_are_cleaned_by_the_next_run(tmp_path):
    parent = tmp_path / "outs"
    parent.mkdir()
    p = _start_slow(tmp_path, parent / "o")
    p.kill()   # SIGKILL: nothing can clean up
    p.communicate(timeout=300)
    left = [n.name for n in parent.iterdir()]
    assert len(left) == 1 and f"-{p.pid}-" in left[0] and ".mexc-tmp-" in left[0]
    r = _mexc("compile", CKPT, "--target", "hf", "-o", parent / "next")
    assert r.returncode == 0, r.stderr
    assert f"removed {left[0]}, left by a killed mexc run (pid {p.pid})" in r.stderr
    assert [n.name for n in parent.iterdir()] == ["next"]


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_only_leftovers_of_gone_processes_of_this_host_are_cleaned(tmp_path):
    dead, host = _dead_pid(), output.host_tag()
    stale = tmp_path / f".o.mexc-tmp-{host}-{dead}-abcd1234"
    live = tmp_path / f".o.mexc-tmp-{host}-{os.getppid()}-abcd1234"          # its process runs
    other_host = tmp_path / f".o.mexc-tmp-{'0' * 8 if host != '0' * 8 else '1' * 8}-{dead}-abcd1234"
    unrelated = tmp_path / ".o.mexc-tmp-notours"
    box = tmp_path / f".gone.mexc-old-{host}-{dead}-abcd1234"                 # a swap cut short by kill -9
    for d in (stale, live, other_host, unrelated, box / "prev"):
        d.mkdir(parents=True)
        (d / "w.safetensors").write_bytes(b"x" * 10)
    (box / "target").write_bytes(b"gone")
    link = tmp_path / f".l.mexc-tmp-{host}-{dead}-abcd1234"                   # named like one, but a link
    link.symlink_to(live)
    notes: list[str] = []
    compile_checkpoint(CKPT, tmp_path / "new", CompileOptions(target="hf"), log=notes.append)
    assert not stale.exists() and not box.exists()
    assert (tmp_path / "gone" / "w.safetensors").read_bytes() == b"x" * 10
    assert live.is_dir() and other_host.is_dir() and unrelated.is_dir() and link.is_symlink()
    assert sum("left by a killed mexc run" in n for n in notes) == 2
    assert any("gone: put back the previous output" in n for n in notes)


# ------------------------------------------------------------------------------------ names


@pytest.mark.parametrize("length", [250, 255])
def test_a_long_legal_output_name_works(tmp_path, length):
    out = tmp_path / ("n" * length)
    _compile(out)
    assert (out / "model.safetensors").is_file() and [p.name for p in tmp_path.iterdir()] == [out.name]
    _compile(out, target="onnx", force=True)   # the old box / exchange names fit too
    assert (out / "model.onnx").is_file() and [p.name for p in tmp_path.iterdir()] == [out.name]


def test_a_name_past_name_max_is_a_clear_error(tmp_path):
    r = _mexc("compile", CKPT, "--target", "hf", "-o", tmp_path / ("n" * 256))
    _one_error(r.stderr, "longer than 255 bytes")
    assert list(tmp_path.iterdir()) == []


def test_temporary_names_fit_name_max_for_any_name(tmp_path):
    for name in ("a", "é" * 127, "x" * 255, "ü" * 100 + "y" * 55):
        for kind in ("tmp", "old"):
            prefix = output.temp_prefix(tmp_path, name, kind, pid=4194304)
            assert len(os.fsencode(prefix)) + 8 <= 255
            m = output._NAME.match(prefix + "abcd_123")
            assert m and m["kind"] == kind and m["pid"] == "4194304"
