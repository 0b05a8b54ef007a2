"""Run many ``mexc`` cases cheaply, each in its own resource-limited process.

Starting Python with torch costs about 2 s; a case costs a few tens of milliseconds. :class:`ForkServer` starts
one warm server process (this file run as a script: it imports torch and mexc, nothing else runs) and, for each
case, the server forks a child that does what the ``mexc`` console script does (``sys.exit(main(argv))``, with
the interpreter's handling of an uncaught exception, atexit handlers and non-daemon threads) under:

* ``RLIMIT_AS`` (address space, default 4 GiB) and ``RLIMIT_FSIZE`` (largest file, default 256 MiB);
* a wall-clock bound: a child still running after ``timeout`` s is killed with its process group and reported
  as ``timed_out`` (a hang), not waited for;
* a fresh process group, signal dispositions of a fresh interpreter, stdin from /dev/null, stdout and stderr to
  files.

A payload that escapes runs in that child, never in pytest. :func:`problems` checks an outcome against what the
issue asks of every hostile input.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

GiB = 1 << 30


@dataclass
class Outcome:
    argv: list[str]
    rc: int | None           # exit status; None when killed by a signal or timed out
    signal: int | None       # the signal that ended the child (SIGKILL after a timeout)
    timed_out: bool
    stdout: str
    stderr: str

    def as_failed(self) -> "Outcome":
        """This outcome as a plain failure (for a death by a signal that is allowed; the rest is still checked)."""
        return Outcome(self.argv, 1, None, False, self.stdout, "error: (killed by its signal)")

    def describe(self) -> str:
        how = ("hung (killed after the time bound)" if self.timed_out else
               f"killed by {signal.Signals(self.signal).name}" if self.signal else f"rc={self.rc}")
        err = self.stderr.strip()
        if len(err) > 1200:
            err = err[:300] + "\n  [...]\n" + err[-800:]
        return f"`mexc {' '.join(self.argv[:1])}`: {how}; stderr: {err or '(empty)'}"


# ------------------------------------------------------------------------------------------ client


class ForkServer:
    """The pytest side: ``run(argv, cwd)`` -> :class:`Outcome`. One server per test module."""

    def __init__(self, *, mem: int = 4 * GiB, fsize: int = 256 << 20):
        env = dict(os.environ, PYTHONWARNINGS="ignore")
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve())], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env, bufsize=1)
        self.mem, self.fsize = mem, fsize
        ready = self.proc.stdout.readline()
        if ready.strip() != "ready":
            raise RuntimeError(f"fork server did not start: {ready!r}")

    def run(self, argv: list[str], cwd: Path, *, timeout: float = 60.0) -> Outcome:
        cwd = Path(cwd)
        req = {"argv": [str(a) for a in argv], "cwd": str(cwd), "timeout": timeout, "mem": self.mem,
               "fsize": self.fsize, "out": str(cwd / ".stdout"), "err": str(cwd / ".stderr")}
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        res = json.loads(self.proc.stdout.readline())
        read = lambda p: Path(p).read_text(errors="replace") if Path(p).exists() else ""  # noqa: E731
        out, err = read(req["out"]), read(req["err"])
        Path(req["out"]).unlink(missing_ok=True)
        Path(req["err"]).unlink(missing_ok=True)
        return Outcome(req["argv"], res["rc"], res["signal"], res["timed_out"], out, err)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


# ------------------------------------------------------------------------------------------ checks


def error_lines(stderr: str) -> list[str]:
    return [l for l in stderr.splitlines() if l.strip()]


def problems(o: Outcome, *, names: tuple[str, ...] = (), canary: Path | None = None,
             parent: Path | None = None, refuse: bool = True, keep: tuple[str, ...] = ()) -> list[str]:
    """What is wrong with ``o`` for a hostile input (empty: nothing).

    ``refuse``: the exit status must be non-zero with exactly one ``error:`` line (plus at most a ``hint:``)
    that contains one of ``names``; otherwise (an input mexc may accept) success is allowed too, but a failure
    must look the same. Always: no hang, no death by a signal, no traceback, the canary absent and its sentinel
    directory ``CANARY.dir`` (the caller makes it; a ``shutil.rmtree`` payload removes it) present, nothing in
    ``parent`` (the output's parent directory) but the names in ``keep`` (a successful output).
    """
    bad = []
    if o.timed_out:
        bad.append("hung (time bound reached)")
    elif o.signal:
        bad.append(f"died of {signal.Signals(o.signal).name}")
    if "Traceback" in o.stderr:
        bad.append("printed a traceback")
    lines = error_lines(o.stderr)
    if not o.timed_out and not o.signal:
        if refuse and o.rc == 0:
            bad.append("accepted (exit status 0)")
        if o.rc != 0:
            if not lines or not lines[0].startswith("error: ") or len(lines) > 2 or (
                    len(lines) == 2 and not lines[1].startswith("hint: ")):
                bad.append("stderr is not one `error:` line plus at most a `hint:` line")
            elif names and not any(n in lines[0] for n in names):
                bad.append(f"the error does not name {' or '.join(names)}")
    if canary is not None and (canary.exists() or not Path(str(canary) + ".dir").is_dir()):
        bad.append("THE CANARY WAS CREATED (or its sentinel directory removed): code from the checkpoint ran")
    if parent is not None and parent.exists():
        left = sorted(p.name for p in parent.iterdir() if p.name not in keep)
        if left:
            bad.append(f"left behind in the output's parent: {left}")
    return bad


# ------------------------------------------------------------------------------------------ server


def _child(req: dict) -> None:
    import resource
    import threading
    import traceback

    os.setpgid(0, 0)
    resource.setrlimit(resource.RLIMIT_AS, (req["mem"], req["mem"]))
    resource.setrlimit(resource.RLIMIT_FSIZE, (req["fsize"], req["fsize"]))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # as the interpreter sets it
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.chdir(req["cwd"])
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    for fd, path in ((1, req["out"]), (2, req["err"])):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(f, fd)
        os.close(f)
    sys.argv = ["mexc", *req["argv"]]
    rc = 1
    try:
        from mexc.tools.cli import main

        rc = main(req["argv"])
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, (int, type(None))):
            sys.stderr.write(f"{e.code}\n")
    except KeyboardInterrupt:
        traceback.print_exc()
        rc = 130
    except BaseException:
        traceback.print_exc()
        rc = 1
    try:
        for t in threading.enumerate():  # the interpreter joins non-daemon threads before it exits
            if t is not threading.main_thread() and not t.daemon:
                t.join()
        import atexit

        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(rc if isinstance(rc, int) else 1)


def _serve() -> None:
    import threading

    import importlib
    import pkgutil

    import torch.distributed.checkpoint  # noqa: F401  (the expensive imports, once: ~5 s, then ~50 ms a case)

    import mexc

    for m in pkgutil.walk_packages(mexc.__path__, "mexc."):
        if not m.name.startswith(("mexc.tests", "mexc.tools.bench")):
            try:
                importlib.import_module(m.name)
            except Exception:  # optional backends (TensorRT) stay unimported; the case reports what it meets
                pass

    assert threading.active_count() == 1, "the server must not fork with threads running"
    print("ready", flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            _child(req)
        deadline = time.monotonic() + req["timeout"]
        timed_out = False
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                timed_out = True
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                _, status = os.waitpid(pid, 0)
                break
            time.sleep(0.005)
        try:
            os.killpg(pid, signal.SIGKILL)  # anything the case left running (a payload's shell)
        except (ProcessLookupError, PermissionError):
            pass
        sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        rc = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
        print(json.dumps({"rc": rc, "signal": sig, "timed_out": timed_out}), flush=True)


if __name__ == "__main__":
    _serve()
