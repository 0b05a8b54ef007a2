"""Run the ``mexc`` CLI and catch a phase of it, for signal and fault injection.

    python phase.py PHASE MARKER ACTION -- ARGV...

An audit hook (PEP 578) watches ``import``, ``open`` and ``os.rename``/``os.replace`` events, so the phase is
found without knowing mexc's internals: ``mexc`` is the first import of a mexc submodule from inside
the package (its ``__init__`` has begun: nothing earlier can be guarded by any Python program; the console
script's own ``from mexc.tools.cli import main`` raises its event before the parent packages are imported); ``startup`` is the import of torch (mexc's start-up is mostly that);
``lift`` is the first open of a checkpoint file (``model_optim_rng.pt``, ``.metadata``,
``common.pt``); ``write`` the first open for writing below the output's parent directory (``-o``'s parent);
``rename`` the first rename whose source or target is the output. There it creates MARKER once, then:

* ``mark``: only creates MARKER;
* ``wait``: blocks (in that thread) until the test removes MARKER (the test sends its signal first), at most 60 s;
* ``truncate``: truncates every ``model_optim_rng.pt`` / ``*.distcp`` file of the checkpoint to 0 bytes (another
  process cutting the files while mexc has them memory-mapped), then goes on;
* ``sigint``: sends SIGINT to this process (it lands right after the hooked call), then goes on.
"""

import os
import signal
import sys
import time
from pathlib import Path

phase, marker, action, sep, *argv = sys.argv[1:]
assert sep == "--"
out = Path(argv[argv.index("-o") + 1]).absolute() if "-o" in argv else None
ckpt = Path(argv[1]).absolute()
fired = False
CKPT_FILES = ("model_optim_rng.pt", ".metadata", "common.pt")


def _fire():
    global fired
    fired = True
    Path(marker).touch()
    if action == "wait":
        end = time.monotonic() + 60
        while os.path.exists(marker) and time.monotonic() < end:
            time.sleep(0.01)
    elif action == "truncate":
        for f in ckpt.rglob("*"):
            if f.name == "model_optim_rng.pt" or f.suffix == ".distcp":
                os.truncate(f, 0)
    elif action == "sigint":
        os.kill(os.getpid(), signal.SIGINT)


def _writing(mode, flags) -> bool:
    if isinstance(mode, str) and any(c in mode for c in "wax+"):
        return True
    return isinstance(flags, int) and bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))


def _hook(event, args):
    if fired:
        return
    if event == "import" and args and (phase == "startup" and args[0] == "torch" or
                                       phase == "mexc" and str(args[0]).startswith("mexc.") and "mexc" in sys.modules):
        _fire()
    elif event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.fsdecode(args[0])
        if phase == "lift" and path.endswith(CKPT_FILES):
            _fire()
        elif phase == "write" and out is not None and _writing(*(list(args[1:3]) + [None, None])[:2]) and \
                os.path.abspath(path).startswith(str(out.parent) + os.sep):
            _fire()
    elif event in ("os.rename", "os.replace") and phase == "rename" and out is not None:
        paths = {os.path.abspath(os.fsdecode(a)) for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))}
        if str(out) in paths:
            _fire()


sys.addaudithook(_hook)
sys.argv[0] = str(Path(sys.executable).parent / "mexc")  # as the `mexc` console script runs (argv[0] .../bin/mexc)
from mexc.tools.cli import main  # noqa: E402

sys.exit(main(argv))
