"""Hostile and unlucky inputs (issue #14): generated corpora, run against the real ``mexc`` command.

Every case is a real checkpoint (``examples/llama-tiny``, the megatron-core torch_dist fixtures) with one thing
made hostile by the generators of ``tests/hostile``: a pickle payload whose action is a canary file (placed
before / inside / after the real data of ``model_optim_rng.pt``, ``common.pt``, ``.metadata``, the in-DCP
``common_state``, DCP chunk items), or a declared size / offset / shape / path / tiling / rank layout that lies.
Each runs ``mexc inspect`` and ``mexc compile --target hf --quiet`` in a forked child of a warm server
(``hostile.forkserver``: 4 GiB address space, 256 MiB largest file, 60 s) and must be refused with exactly one
``error:`` line (plus at most a ``hint:``) naming the file, no traceback, the canary never created, nothing left
in the output's parent directory. Inputs mexc never needs to unpickle (a DCP tensor chunk's pickle, an
``_extra_state`` item), harmless payloads (a numpy shape never allocated) and the few mutations marked so may
also be accepted, but then the output must equal the base's own, tensor for tensor. An oracle test checks that
the payloads are live: Python's unrestricted unpickler, in a throw-away process, creates their canaries.

Signals and faults use real ``python -m mexc.tools.cli`` processes: SIGINT / SIGTERM / SIGHUP at start-up,
during lift and during writing (the phase is found with an audit hook on ``open``, ``hostile/phase.py``), a
SIGKILL whose leftovers the next run must clean, a rank file truncated while mapped (SIGBUS must become an
error), an interrupt between the renames of a ``--force`` swap.

Hypothesis draws the random parts (payload x carrier x position x protocol; declared offsets, lengths and chunk
tilings), derandomized so CI runs the same examples. A failure message lists every command that misbehaved
with its exit status and stderr; ``python tests/hostile/report.py`` writes the whole list as Markdown.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from hostile import carriers, mutate, pickles
from hostile.forkserver import GiB, ForkServer, Outcome, problems
from megatron_fixtures import megatron_checkpoint

PHASE = Path(__file__).resolve().parent / "hostile" / "phase.py"
H = settings(max_examples=12, derandomize=True, database=None, deadline=None,
             phases=(Phase.explicit, Phase.generate),  # no shrinking: each example is a process
             suppress_health_check=list(HealthCheck))


def _allowed() -> dict[str, list[str]]:
    """Every module the allow-list admits: found in mexc's loader modules, plus the modules of the policy the
    issue found (module-wide DCP allowance), so the corpus keeps attacking them after the rewrite."""
    import importlib

    mods = []
    for name in ("mexc.frontends.megatron.safe_load", "mexc.frontends.megatron.unpickle"):
        try:
            mods.append(importlib.import_module(name))
        except ImportError:
            pass
    found = pickles.allowed_names(*mods)
    for m in ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem",
              "torch.distributed.checkpoint.planner", "torch.distributed.checkpoint._extension", "argparse",
              "collections", "torch", "pathlib", "numpy", "megatron.core.enums"):
        found.setdefault(m, [])
    return {m: n for m, n in found.items() if not m.startswith(("mexc", "_frozen"))}


ALLOWED = _allowed()
WHERE = ("before", "inside", "after")


def _payloads(canary: str, protocol: int = 2) -> dict[str, pickles.Payload]:
    return {p.id: p for p in pickles.all_payloads(canary, ALLOWED, protocol)}


def _corpus() -> list[tuple[str, str, str, str | None]]:
    """(carrier, payload id, where, key): every payload once, carriers and positions in rotation so that every
    (carrier, position, key) triple occurs; payloads that use memo slots only ``after`` (MEMOIZE follows)."""
    ids = list(_payloads("/CANARY"))
    slots = [(c.id, w, k) for c in carriers.CARRIERS for w in WHERE for k in (c.keys if w == "inside" else (None,))]
    out = []
    for n, pid in enumerate(ids):
        c, w, k = slots[n % len(slots)]
        if (_payloads("/CANARY")[pid].memo and carriers.CARRIER[c].protocol >= 4) or pid.startswith("frame"):
            w, k = "after", None
        out.append((c, pid, w, k))
    structure = [p for p in ids if p.startswith(("dag", "deep", "list"))]
    return out + [(c, p, "inside", "model") for c, p in zip(("rank0", "rank1", "rank1-nonzip", "rank0"), structure)]


CORPUS = _corpus()


@pytest.fixture(scope="module")
def server():
    fs = ForkServer(mem=4 * GiB)
    yield fs
    fs.close()


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    dist = megatron_checkpoint("llama", tp=2, pp=1, fmt="torch_dist") / "ckpt"
    return carriers.make_bases(tmp_path_factory.mktemp("bases"), dist)


@pytest.fixture(scope="module")
def references(server, bases, tmp_path_factory):
    """Each base compiled as it is (hf): what an accepted case must reproduce."""
    root = tmp_path_factory.mktemp("references")
    out = {}
    for name in bases:
        ckpt = carriers.copy_base(bases, name, root / f"{name}-ckpt")
        carriers.finish(ckpt)
        o = server.run(["compile", ckpt, "--target", "hf", "-o", root / name, "--quiet"], root)
        assert o.rc == 0, o.describe()
        out[name] = root / name
    return out


_n = itertools.count()


def _case_dir(tmp: Path) -> Path:
    d = tmp / f"case{next(_n)}"
    d.mkdir(parents=True)
    return d


def same_weights(out: Path, reference: Path) -> list[str]:
    """An accepted hostile input must convert faithfully: every tensor equal to the base's own output."""
    from safetensors.torch import load_file

    def tensors(d: Path) -> dict:
        return {k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(f).items()}

    got, want = tensors(out), tensors(reference)
    if got.keys() != want.keys():
        return [f"accepted, but the output has other tensors: {sorted(got.keys() ^ want.keys())[:6]}"]
    diff = sorted(k for k in want if not (got[k].dtype == want[k].dtype and got[k].shape == want[k].shape
                                         and bool((got[k] == want[k]).all())))
    return [f"accepted, but tensors differ from the base's output: {diff[:6]}"] if diff else []


def run_both(server, case: Path, ckpt: Path, *, names, canary=None, refuse=True, inspect_refuses=None,
             reference: Path | None = None) -> list[str]:
    """``mexc inspect CKPT`` and ``mexc compile CKPT --target hf -o PARENT/out --quiet``; the problems found.
    ``inspect_refuses`` (default: ``refuse``): False where only reading tensor bytes can see the fault;
    ``reference``: the base's own output, which an accepted compile must reproduce tensor for tensor."""
    found = []
    for cmd in ("inspect", "compile"):
        must = refuse if cmd == "compile" or inspect_refuses is None else inspect_refuses
        parent = case / f"parent-{cmd}"
        parent.mkdir()
        argv = ["inspect", ckpt] if cmd == "inspect" else ["compile", ckpt, "--target", "hf", "-o",
                                                            parent / "out", "--quiet"]
        o = server.run(argv, parent)
        bad = problems(o, names=names, canary=canary, parent=parent, refuse=must, keep=("out",) if o.rc == 0 else ())
        if cmd == "compile" and o.rc == 0 and reference is not None and not bad:
            bad = same_weights(parent / "out", reference)
        if bad:
            found.append(f"{'; '.join(bad)} <- {o.describe()}")
    return found


def hostile_pickle(server, tmp: Path, bases, references, carrier_id: str, payload_id: str, where: str, key,
                   protocol=2, wrap=lambda ops: ops) -> list[str]:
    c = carriers.CARRIER[carrier_id]
    case = _case_dir(tmp)
    canary = case / "CANARY"
    Path(f"{canary}.dir").mkdir()  # the sentinel a shutil.rmtree payload would remove
    p = _payloads(str(canary), protocol)[payload_id]
    p = pickles.Payload(p.id, wrap(p.ops), p.code, p.memo, p.harmless)
    ckpt = carriers.copy_base(bases, c.base, case / "ckpt")
    carriers.put(ckpt, c, p, where, key)
    in_model = where == "inside" and key == "model" and not c.unread  # a shared or deep sub-dict in the weights
    harmless = p.harmless and not in_model
    return run_both(server, case, ckpt, names=c.names, canary=canary, refuse=not (c.unread or harmless),
                    reference=references[c.base])


# ------------------------------------------------------------------------------------------ controls


@pytest.mark.parametrize("carrier", [c.id for c in carriers.CARRIERS])
def test_control_benign_injection_compiles(server, tmp_path, bases, carrier):
    """The carriers are sound: an inert ``None`` put inside each pickle leaves a checkpoint that compiles (so a
    refusal below is the payload's doing, not the generator's)."""
    c = carriers.CARRIER[carrier]
    case = _case_dir(tmp_path)
    ckpt = carriers.copy_base(bases, c.base, case / "ckpt")
    carriers.put(ckpt, c, pickles.Payload("none", pickles.pickle.NONE), "inside", c.keys[-1])
    for argv in (["inspect", ckpt], ["compile", ckpt, "--target", "hf", "-o", case / "out", "--quiet"]):
        o = server.run(argv, case)
        assert o.rc == 0, o.describe()
    assert (case / "out" / "config.json").is_file()


# ------------------------------------------------------------------------------------------ pickles

# Code payloads that cannot run code even unrestricted: NEWOBJ(_EX) calls os.system.__new__, a slot-state BUILD
# only sets a class attribute. They are still refused below; the rest must be live ammunition.
_DUDS = {"newobj-os.system", "newobj_ex-os.system", "build-class-slotstate"}

_LIVE_PROBE = """
import json, os, pickle, sys
sys.path.insert(0, sys.argv[1])
from hostile import pickles
from test_hostile_inputs import ALLOWED
root, live = sys.argv[2], []
for n, p in enumerate(pickles.all_payloads(os.path.join(root, "c", "CANARY"), ALLOWED, 2)):
    if not p.code:
        continue
    d = os.path.join(root, str(n))
    os.makedirs(d + "/c/CANARY.dir")
    canary = os.path.join(d, "c", "CANARY")
    p = {q.id: q for q in pickles.all_payloads(canary, ALLOWED, 2)}[p.id]
    try:
        pickle.loads(p.ops + pickle.STOP)
    except Exception:
        pass
    if os.path.exists(canary) or not os.path.isdir(canary + ".dir"):
        live.append(p.id)
print(json.dumps(live))
"""


def test_payloads_run_code_when_unpickled_without_a_policy(tmp_path):
    """The oracle for the corpus: Python's own unpickler, unrestricted (in a throw-away process), runs every code
    payload (creates its canary) except the known duds, and every dotted route the generator discovered."""
    import json

    r = subprocess.run([sys.executable, "-c", _LIVE_PROBE, str(Path(__file__).parent), str(tmp_path)],
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert r.returncode == 0, r.stderr[-3000:]
    live = set(json.loads(r.stdout.splitlines()[-1]))
    code = {p.id for p in pickles.all_payloads("/C", ALLOWED, 2) if p.code}
    must = {p for p in code if p not in _DUDS and not (p.startswith("dotted-") and p.endswith(":os.system"))}
    assert must <= live, f"payloads that do nothing even unrestricted: {sorted(must - live)}"
    assert len(live) >= 40, sorted(live)



@pytest.mark.parametrize("carrier,payload,where,key", CORPUS, ids=[f"{c}-{w}{'-' + k if k else ''}-{p}"
                                                                 for c, p, w, k in CORPUS])
def test_hostile_pickle_is_refused(server, tmp_path, bases, references, carrier, payload, where, key):
    found = hostile_pickle(server, tmp_path, bases, references, carrier, payload, where, key)
    assert not found, f"{carrier}/{where}/{key}/{payload}:\n" + "\n".join(found)


_WRAPS = {
    "bare": lambda ops: ops,
    "in-list": lambda ops: pickles.pickle.EMPTY_LIST + ops + pickles.pickle.APPEND,
    "in-dict": lambda ops: pickles.pickle.EMPTY_DICT + pickles.s("k") + ops + pickles.pickle.SETITEM,
    "in-tuple": lambda ops: pickles.tup(pickles.i(1), ops),
    "nested-3": lambda ops: (pickles.pickle.EMPTY_LIST * 3 + ops + pickles.pickle.APPEND * 3),
}


@H
@given(data=st.data())
def test_hostile_pickle_random(server, tmp_path, bases, references, data):
    """Random payload x carrier x position x key x protocol x nesting."""
    carrier = data.draw(st.sampled_from([c.id for c in carriers.CARRIERS]), "carrier")
    c = carriers.CARRIER[carrier]
    protocol = data.draw(st.integers(2, 5), "protocol")
    pid = data.draw(st.sampled_from(sorted(p for p, v in _payloads("/C", protocol).items() if v.code)), "payload")
    where = data.draw(st.sampled_from(WHERE), "where")
    key = data.draw(st.sampled_from(c.keys), "key")
    wrap = data.draw(st.sampled_from(sorted(_WRAPS)), "wrap")
    found = hostile_pickle(server, tmp_path, bases, references, carrier, pid, where, key, protocol, _WRAPS[wrap])
    assert not found, "\n".join(found)


@H
@given(data=st.data())
def test_fuzzed_pickles_never_crash(server, tmp_path, bases, data):
    """Random byte flips, insertions and truncations of a real pickle: refused or accepted, never a traceback,
    a hang, a crash or anything left behind (a flip may land in a harmless constant, so acceptance is allowed)."""
    carrier = carriers.CARRIER[data.draw(st.sampled_from(["rank0", "rank1-nonzip", "common.pt", ".metadata",
                                                          "common_state"]), "carrier")]
    edits = data.draw(st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255),
                                         st.sampled_from(["flip", "insert", "delete"])), min_size=1, max_size=4),
                      "edits")
    cut = data.draw(st.one_of(st.none(), st.floats(0, 1)), "truncate at")

    def patch(raw: bytes) -> bytes:
        b = bytearray(raw)
        for at, byte, how in edits:
            k = int(at * len(b))
            if how == "flip":
                b[k] = byte
            elif how == "insert":
                b[k:k] = bytes([byte])
            else:
                del b[k]
        return bytes(b[: int(cut * len(b))] if cut is not None else b)

    case = _case_dir(tmp_path)
    ckpt = carriers.copy_base(bases, carrier.base, case / "ckpt")
    carriers.transform(ckpt, carrier, patch)
    found = run_both(server, case, ckpt, names=(), refuse=False)  # an error may be about a consequence
    assert not found, "\n".join(found)


# ------------------------------------------------------------------------------------------ declared metadata


@pytest.mark.parametrize("m", mutate.MUTATIONS, ids=[f"{m.base}-{m.id}" for m in mutate.MUTATIONS])
def test_lying_metadata_is_refused(server, tmp_path, bases, references, m):
    case = _case_dir(tmp_path)
    ckpt = carriers.copy_base(bases, m.base, case / "ckpt")
    carriers.finish(ckpt)
    m.apply(ckpt, case)
    found = run_both(server, case, ckpt, names=m.names, refuse=m.refuse, inspect_refuses=m.inspect_refuses and m.refuse,
                     reference=references[m.base])
    assert not found, f"{m.base}/{m.id}:\n" + "\n".join(found)


@H
@given(data=st.data())
def test_lying_metadata_random(server, tmp_path, bases, data):
    """Random declared offsets/lengths outside the file, and random moves of one chunk of a TP-split tensor
    (any move of one chunk breaks the exact tiling)."""
    kind = data.draw(st.sampled_from(["offset", "length", "chunk"]), "kind")
    which = data.draw(st.integers(0, 1), "chunk")
    big = st.one_of(st.sampled_from([2 ** 31, 2 ** 32, 2 ** 62, 2 ** 63, 2 ** 64]), st.integers(2 ** 20, 2 ** 80))
    if kind == "offset":
        v = data.draw(st.one_of(st.integers(-(2 ** 70), -1), big), "offset")
        fn = mutate.set_info("offset", v, which)
    elif kind == "length":
        v = data.draw(st.one_of(st.integers(-(2 ** 70), -1), big), "length")
        fn = mutate.set_info("length", v, which)
    else:
        dim = data.draw(st.integers(0, 1), "dim")
        delta = data.draw(st.integers(-200, 200).filter(bool), "delta")
        field = data.draw(st.sampled_from(["offsets", "sizes"]), "field")

        def move(chunks):
            o, s, info = chunks[which]
            t = list(o if field == "offsets" else s)
            t[dim] += delta
            chunks[which] = (tuple(t), s, info) if field == "offsets" else (o, tuple(t), info)
            return chunks

        if field == "sizes" and 64 + delta <= 0:  # the chunks are 64 x 64; a negative size is a corpus case
            delta = -delta
        fn = mutate.set_chunks(move)
    case = _case_dir(tmp_path)
    ckpt = carriers.copy_base(bases, "dist", case / "ckpt")
    fn(ckpt, case)
    found = run_both(server, case, ckpt, names=mutate.DIST)
    assert not found, "\n".join(found)


# ------------------------------------------------------------------------------------------ signals, faults


def _limits():
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (4 * GiB, 4 * GiB))
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 << 20, 256 << 20))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # as from a terminal (a CI shell may start us with it ignored)
    os.setsid()


def spawn(args: list, cwd: Path, phase: str | None = None, marker: Path | None = None, action: str = "wait"):
    """A real ``mexc`` process (``hostile/phase.py`` wraps the CLI when a phase is to be caught)."""
    pre = [sys.executable, str(PHASE), phase, str(marker), action, "--"] if phase else [
        sys.executable, "-m", "mexc.tools.cli"]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.Popen([*pre, *map(str, args)], cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, preexec_fn=_limits)


def finish(proc, argv, timeout=120) -> Outcome:
    try:
        out, err = proc.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        timed_out = True
    rc = proc.returncode
    return Outcome([str(a) for a in argv], rc if rc >= 0 else None, -rc if rc < 0 and not timed_out else None,
                   timed_out, out, err)


def wait_marker(proc, marker: Path, timeout: float = 120) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if marker.exists():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.01)
    return False


def _died_silently(o: Outcome, sig: int) -> bool:
    """Killed by ``sig`` itself with nothing printed: the default action, like any program's, before mexc
    installed its handlers or once Python's finalization restored the defaults (CPython's ``_PySignal_Fini``)."""
    return o.signal == sig and not o.stderr.strip()


def _died_silently_problems(o: Outcome, parent: Path) -> list[str]:
    """A death by the signal itself, before mexc's handlers are installed or after Python's finalization has put
    the default actions back (the output is then already swapped in): nothing left, or the complete output."""
    done = (parent / "out" / "mexc-manifest.json").is_file()
    return problems(o.as_failed(), parent=parent, keep=("out",) if done else ())


def _interrupted(o: Outcome, parent: Path, sig: int) -> list[str]:
    """An interrupted compile: non-zero, one error line, nothing left; a run that finished first (exit 0) or was
    interrupted after its output was swapped in (the error says so): the output complete, nothing else left."""
    if o.rc == 0 or "was written in full" in o.stderr:
        return problems(o, parent=parent, refuse=o.rc != 0, keep=("out",)) + (
            [] if (parent / "out" / "config.json").is_file() else ["exit 0 but no complete output"])
    return problems(o, parent=parent, refuse=True)


@pytest.fixture(scope="module")
def legacy(bases, tmp_path_factory):
    d = tmp_path_factory.mktemp("legacy") / "ckpt"
    carriers.copy_base(bases, "legacy", d)
    carriers.finish(d)
    return d


@settings(max_examples=4, derandomize=True, database=None, deadline=None, phases=(Phase.explicit, Phase.generate),
          suppress_health_check=list(HealthCheck))
@given(sig=st.sampled_from([signal.SIGINT, signal.SIGTERM, signal.SIGHUP]), delay=st.floats(0.0, 3.0))
def test_signal_at_startup(tmp_path, legacy, sig, delay):
    """A signal at a random moment after mexc's first module is imported (the interpreter's own start-up, which
    no program can guard, is excluded)."""
    case = _case_dir(tmp_path)
    parent = case / "parent"
    parent.mkdir()
    argv = ["compile", legacy, "--target", "hf", "-o", parent / "out", "--quiet"]
    marker = case / "MARK"
    proc = spawn(argv, case, "mexc", marker, action="mark")
    wait_marker(proc, marker)
    time.sleep(delay)
    proc.send_signal(sig)
    o = finish(proc, argv)
    found = _died_silently_problems(o, parent) if _died_silently(o, sig) else _interrupted(o, parent, sig)
    assert not found, f"{signal.Signals(sig).name} after {delay:.2f}s: " + "\n".join(found)


_PHASES = [(phase, sig, base) for (phase, sig), base in zip(
    itertools.product(["startup", "lift", "write"], [signal.SIGINT, signal.SIGTERM, signal.SIGHUP]),
    itertools.cycle(["legacy", "dist"]))]  # each phase and each signal meets both formats


def _compile_case(tmp_path, bases, base):
    """A fresh copy of a base checkpoint, an empty output parent, the compile argv and the phase marker path."""
    case = _case_dir(tmp_path)
    ckpt = carriers.copy_base(bases, base, case / "ckpt")
    carriers.finish(ckpt)
    parent = case / "parent"
    parent.mkdir()
    return case, parent, ["compile", ckpt, "--target", "hf", "-o", parent / "out", "--quiet"], case / "MARK"


@pytest.mark.parametrize("phase,sig,base", _PHASES,
                         ids=[f"{p}-{signal.Signals(s).name}-{b}" for p, s, b in _PHASES])
def test_signal_during_phase(tmp_path, bases, phase, sig, base):
    case, parent, argv, marker = _compile_case(tmp_path, bases, base)
    proc = spawn(argv, case, phase, marker)
    reached = wait_marker(proc, marker)
    proc.send_signal(sig)
    marker.unlink(missing_ok=True)  # lets the phase hook return
    o = finish(proc, argv)
    assert reached, f"{base}: the {phase} phase was never reached: {o.describe()}"
    found = _died_silently_problems(o, parent) if _died_silently(o, sig) else _interrupted(o, parent, sig)
    assert not found, f"{base}: {signal.Signals(sig).name} during {phase}: " + "\n".join(found)


def test_killed_run_leftovers_are_cleaned_by_the_next_run(tmp_path, server, legacy):
    case = _case_dir(tmp_path)
    parent = case / "parent"
    parent.mkdir()
    argv = ["compile", legacy, "--target", "hf", "-o", parent / "out", "--quiet"]
    marker = case / "MARK"
    proc = spawn(argv, case, "write", marker)
    assert wait_marker(proc, marker), finish(proc, argv).describe()
    proc.send_signal(signal.SIGKILL)
    marker.unlink(missing_ok=True)
    finish(proc, argv)
    o = server.run(argv, parent)
    found = problems(o, parent=parent, refuse=False, keep=("out",))
    assert o.rc == 0 and not found, "\n".join(found) + "\n" + o.describe()


@pytest.mark.parametrize("base", ["legacy", "dist"])
def test_rank_file_truncated_while_read(tmp_path, bases, base):
    """The files are cut to nothing when writing starts (tensors are memory-mapped by then): SIGBUS on the
    mapping must become one error naming the file, with nothing left behind."""
    case, parent, argv, marker = _compile_case(tmp_path, bases, base)
    proc = spawn(argv, case, "write", marker, action="truncate")
    o = finish(proc, argv)
    assert marker.exists(), f"the write phase was never reached: {o.describe()}"
    found = problems(o, names=("model_optim_rng.pt", ".distcp"), parent=parent)
    assert not found, "\n".join(found)


def test_interrupted_force_swap_keeps_a_complete_output(tmp_path, server, legacy):
    """SIGINT at the first rename of a ``--force`` replacement: OUT is still a complete output (old or new)."""
    case = _case_dir(tmp_path)
    parent = case / "parent"
    parent.mkdir()
    out = parent / "out"
    assert server.run(["compile", legacy, "--target", "hf", "-o", out, "--quiet"], parent).rc == 0
    argv = ["compile", legacy, "--target", "hf", "-o", out, "--quiet", "--force"]
    marker = case / "MARK"
    proc = spawn(argv, case, "rename", marker, action="sigint")
    o = finish(proc, argv)
    assert (out / "config.json").is_file() and (out / "mexc-manifest.json").is_file(), (
        f"no complete output after an interrupted --force swap: {sorted(p.name for p in parent.iterdir())}; "
        + o.describe())
    left = sorted(p.name for p in parent.iterdir() if p.name != "out")
    assert not left or all(n in o.stderr for n in left), f"left {left} without saying so: {o.describe()}"
    assert "Traceback" not in o.stderr, o.describe()
