"""One unpickling policy for every pickle mexc reads from a checkpoint (nothing in it can run code).

Every loader (legacy ``model_optim_rng.pt``, ``distrib_optim.pt``, ``common.pt``, DCP ``.metadata``, the in-DCP
``common_state`` item, DCP chunk records) goes through :class:`SafeUnpickler`:

* **Exact names.** A ``GLOBAL`` / ``STACK_GLOBAL`` resolves only an exact ``(module, qualified name)`` pair of
  :data:`POLICY` (after the standard Python 2 name mapping that protocol-2 pickles, such as ``torch.save``'s,
  use). Nothing is imported and no attribute chain is walked: ``torch.distributed.checkpoint.metadata`` +
  ``os.system`` is simply an unknown pair.
* **Inert stand-ins.** Any ``megatron.*`` class (an enum, a config object) and numpy's array / dtype / scalar
  reconstruction resolve to stand-ins that record what they were given and run nothing; numpy arrays are never
  allocated (Megatron's ``rng_state`` is not needed to convert a model), object arrays are refused.
* **Opcodes.** ``REDUCE`` calls only a callable of the policy; ``NEWOBJ``/``NEWOBJ_EX`` build only a class of
  the policy; ``BUILD`` sets state only on such an instance (through the class's own ``__setstate__`` or its
  ``__dict__``); ``INST``, ``OBJ``, ``EXT1/2/4`` and text ``PERSID`` are refused.
* **Bounds.** The callers cap a pickle's size; at most :data:`MAX_DEPTH` levels of nesting (checked on the result as
  a DAG, so memo-shared structures cost their size, not their expansion); a ``bytearray`` or byte string is made
  only from bytes present in the file.

megatron-core's own list of what its saves contain is ``megatron/core/safe_globals.py`` (``Signals``,
``BytesIO``, ``SimpleNamespace``, ``PosixPath``, numpy dtypes, its enums): each has a row here.
"""

from __future__ import annotations

import _compat_pickle
import argparse
import collections
import pickle
import re
import types
from typing import Any, Callable

import torch

from ...errors import UnsafeCheckpointError

MAX_DEPTH = 100        # nesting of containers in the result


class StandIn:
    """An inert record of a class outside mexc found in a pickle (a Megatron enum member or config object).

    ``qualname`` is the pickled ``module.name``; ``args`` what a ``REDUCE``/``NEWOBJ`` passed; the ``BUILD``
    state lands in ``__dict__`` (a dict) or ``state``. ``.name`` / ``.value`` mimic an enum member.
    """

    qualname = "?"

    def __init__(self, *args, **kwargs):
        self.args = args
        self.kwargs = kwargs

    def __setstate__(self, state):
        if isinstance(state, dict) and all(isinstance(k, str) for k in state):
            self.__dict__.update(state)
        else:
            self.state = state

    @property
    def value(self):
        return self.args[0] if self.args else None

    @property
    def name(self) -> str:
        v = self.args[0] if self.args else ""
        return v if isinstance(v, str) else str(v)

    def __eq__(self, other):
        if isinstance(other, StandIn):
            return (self.qualname, self.args) == (other.qualname, other.args)
        return self.value == other  # an enum member compares with its value (Signals.SIGTERM == 15)

    def __hash__(self):
        return hash((self.qualname, repr(self.args)))

    def __repr__(self) -> str:
        return f"<{self.qualname}{self.args!r}>"


_STAND_IN_CLASSES: dict[str, type] = {}


def stand_in(qualname: str) -> type:
    """The stand-in class for ``module.name`` (one class per name, so instances of one name compare equal)."""
    cls = _STAND_IN_CLASSES.get(qualname)
    if cls is None:
        cls = type(qualname.rsplit(".", 1)[-1], (StandIn,), {"qualname": qualname})
        _STAND_IN_CLASSES[qualname] = cls
    return cls


class NumpyStandIn(StandIn):
    """numpy's ``_reconstruct`` / ``dtype`` / dtype classes: records the declared dtype and shape, never the data."""

    def __setstate__(self, state):
        self.state = state
        if isinstance(state, tuple) and len(state) == 5 and isinstance(state[2], NumpyStandIn):
            code = state[2].args[0] if state[2].args else None
            if not isinstance(code, str) or code[:1] in ("O", "V") or not code[1:].isdigit():
                raise UnsafeCheckpointError(f"a numpy array of dtype {str(code)[:20]!r} is refused (object and "
                                            "structured arrays are never built)")
            shape, raw = state[1], state[4]
            if not (isinstance(shape, tuple) and all(isinstance(n, int) and n >= 0 for n in shape)) or (
                    not isinstance(raw, (bytes, bytearray)) or _prod(shape) * int(code[1:]) != len(raw)):
                raise UnsafeCheckpointError(f"a numpy array declares shape {str(shape)[:60]} of {code} but holds "
                                            f"{len(raw) if isinstance(raw, (bytes, bytearray)) else '?'} bytes")
            self.state = ("array", shape, code)  # shape and dtype; the raw bytes are dropped


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _np(qualname: str) -> Callable:
    cls = type("ndarray", (NumpyStandIn,), {"qualname": qualname})
    _STAND_IN_CLASSES[qualname] = cls
    return cls


def _codecs_encode(text, encoding="latin1"):
    """Protocol-2 pickles store ``bytes`` as ``_codecs.encode(str, 'latin1')``; nothing else is accepted."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafeCheckpointError("_codecs.encode called with anything but (str, 'latin1')")
    return text.encode("latin1")


def _bytearray(data=b""):
    if not isinstance(data, (bytes, bytearray)):
        raise UnsafeCheckpointError("bytearray() of anything but bytes (it could allocate a declared size)")
    return bytearray(data)


class BytesIOStandIn(StandIn):
    """Transformer Engine 1.x pickles its ``_extra_state`` as an ``io.BytesIO``: kept as bytes, never used."""

    qualname = "io.BytesIO"

    def __setstate__(self, state):
        self.state = state[0] if isinstance(state, tuple) and state and isinstance(state[0], bytes) else b""


def _path(*parts):
    """``pathlib`` paths are kept as text: nothing touches the file system."""
    if not all(isinstance(p, str) for p in parts):
        raise UnsafeCheckpointError("a pathlib path of anything but strings")
    import pathlib

    return str(pathlib.PurePosixPath(*parts))  # pure: no file-system access


def _torch_layout(name):
    if name not in ("torch.strided", "torch.sparse_coo", "torch.sparse_csr"):
        raise UnsafeCheckpointError(f"unknown torch layout {name!r}")
    return getattr(torch, name.split(".", 1)[1])


def _policy() -> dict[tuple[str, str], Any]:
    """Exact ``(module, name)`` -> what it resolves to. One row per name real saves are known to contain."""
    import signal

    p: dict[tuple[str, str], Any] = {
        ("argparse", "Namespace"): argparse.Namespace,                   # Megatron-LM's saved args
        ("types", "SimpleNamespace"): types.SimpleNamespace,             # megatron safe_globals
        ("collections", "OrderedDict"): collections.OrderedDict,         # state dicts
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("builtins", "slice"): slice,
        ("builtins", "complex"): complex,
        ("builtins", "bytearray"): _bytearray,
        ("_codecs", "encode"): _codecs_encode,                           # bytes in protocol-2 pickles
        ("signal", "Signals"): stand_in("signal.Signals"),              # args.exit_signal since core_v0.16
        ("io", "BytesIO"): BytesIOStandIn,                               # Transformer Engine 1.x _extra_state
        ("_io", "BytesIO"): BytesIOStandIn,
        ("pathlib", "PosixPath"): _path,
        ("pathlib", "PurePosixPath"): _path,
        ("torch", "Size"): torch.Size,
        ("torch", "device"): torch.device,
        ("torch.serialization", "_get_layout"): _torch_layout,
    }
    for name in ("float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8",
                 "bool", "float8_e4m3fn", "float8_e5m2", "complex64", "complex128", "uint16", "uint32", "uint64",
                 "half", "float", "double", "long", "int", "short"):
        if isinstance(getattr(torch, name, None), torch.dtype):
            p[("torch", name)] = getattr(torch, name)
    for name in ("contiguous_format", "channels_last", "preserve_format"):
        p[("torch", name)] = getattr(torch, name)
    for ver in ("numpy.core", "numpy._core"):                             # np.random.get_state() in rng_state
        p[(f"{ver}.multiarray", "_reconstruct")] = _np(f"{ver}.multiarray._reconstruct")
        p[(f"{ver}.multiarray", "scalar")] = _np(f"{ver}.multiarray.scalar")
    p[("numpy", "ndarray")] = _np("numpy.ndarray")
    p[("numpy", "dtype")] = _np("numpy.dtype")
    for dt in ("UInt32DType", "Int64DType", "Float64DType", "Float32DType", "Int32DType", "UInt8DType",
               "BoolDType"):
        p[("numpy.dtypes", dt)] = _np(f"numpy.dtypes.{dt}")
    del signal
    return p


_DCP_MODULE = "torch.distributed.checkpoint."
_DCP_NAMES = ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
              "TensorProperties", "_MEM_FORMAT_ENCODING", "MetadataIndex", "StorageMeta", "WriteItemType",
              "LoadItemType", "BytesIOWriteData", "TensorWriteData", "WriteItem", "ReadItem", "SavePlan", "LoadPlan",
              "_StorageInfo", "_StoragePrefix", "SerializationFormat")


def _add_dcp_rows() -> None:
    """The rows of a DCP ``.metadata`` pickle (``torch.distributed.checkpoint``'s metadata, planner and filesystem
    classes), added on the first name from those modules: importing them costs ~0.6 s, which a legacy
    checkpoint never needs."""
    global _dcp_added
    from torch.distributed.checkpoint import filesystem, metadata, planner

    for mod in (metadata, planner, filesystem):
        for name in _DCP_NAMES:
            if name in vars(mod):
                POLICY[(mod.__name__, name)] = vars(mod)[name]
    _dcp_added = True


_dcp_added = False
POLICY: dict[tuple[str, str], Any] = _policy()  # safe_load adds the torch.save rows (storages, tensors)
_MEGATRON_NAME = re.compile(r"^megatron(\.[A-Za-z_]\w*)+$")
_QUALNAME = re.compile(r"^[A-Za-z_]\w*$")  # no dotted names: a stand-in is for a class, not an attribute chain
MAX_ITEMS = 1 << 20    # entries in one container (a real state dict or args has thousands)


def resolve(module: str, name: str, proto: int) -> Any:
    """What ``module.name`` resolves to under the policy, or :class:`UnsafeCheckpointError`."""
    if proto < 3:
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
    if module.startswith(_DCP_MODULE) and not _dcp_added:
        _add_dcp_rows()
    hit = POLICY.get((module, name))
    if hit is not None:
        return hit
    if _MEGATRON_NAME.match(module) and _QUALNAME.match(name):
        return stand_in(f"{module}.{name}")  # inert: records a name and its values, runs nothing
    raise UnsafeCheckpointError(f"refused to unpickle {module}.{name}: not on mexc's allow-list")


class SafeUnpickler(pickle._Unpickler):  # the pure-Python unpickler: every opcode passes through dispatch
    """A :class:`pickle.Unpickler` that follows :func:`resolve` and refuses code-running opcodes.

    ``persistent_load`` is the caller's (torch storages); the default refuses any persistent id.
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, *, persistent_load: Callable | None = None):
        super().__init__(file, encoding="latin1")  # py2 str in protocol-2 pickles -> str
        self._ops = 0
        self._allowed_ids: set[int] = set()
        if persistent_load is not None:
            self.persistent_load = persistent_load

    def persistent_load(self, pid):
        raise UnsafeCheckpointError("unexpected persistent id in a pickle that should hold none")

    def find_class(self, module, name):
        if not isinstance(module, str) or not isinstance(name, str):
            raise UnsafeCheckpointError("a GLOBAL whose module or name is not a string")
        obj = resolve(module, name, self.proto)
        self._allowed_ids.add(id(obj))
        return obj

    def _check_callable(self, f, what):
        if id(f) not in self._allowed_ids:
            raise UnsafeCheckpointError(f"{what} of {type(f).__name__} object that the allow-list did not give")

    def load_reduce(self):
        args = self.stack[-1]
        self._check_callable(self.stack[-2], "REDUCE")
        if not isinstance(args, tuple):
            raise UnsafeCheckpointError("REDUCE with arguments that are not a tuple")
        super().load_reduce()

    def load_newobj(self):
        self._check_callable(self.stack[-2], "NEWOBJ")
        super().load_newobj()

    def load_newobj_ex(self):
        self._check_callable(self.stack[-3], "NEWOBJ_EX")
        super().load_newobj_ex()

    def load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if id(type(inst)) not in self._allowed_ids:
            raise UnsafeCheckpointError(f"BUILD on a {type(inst).__name__} (only classes of the allow-list)")
        setstate = type(inst).__dict__.get("__setstate__") or getattr(type(inst), "__setstate__", None)
        if setstate is not None:
            setstate(inst, state)
            return
        slotstate = None
        if isinstance(state, tuple) and len(state) == 2:
            state, slotstate = state
        for st in (state, slotstate):
            if st and (not isinstance(st, dict) or not all(isinstance(k, str) for k in st)):
                raise UnsafeCheckpointError(f"BUILD state of {type(inst).__name__} is not a dict of names")
        if state:
            inst.__dict__.update(state)
        for k, v in (slotstate or {}).items():
            object.__setattr__(inst, k, v)

    def _refuse(self):
        raise UnsafeCheckpointError("a pickle opcode that can run code (INST/OBJ/EXT/PERSID) is refused")

    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.NEWOBJ[0]] = load_newobj
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex
    dispatch[pickle.BUILD[0]] = load_build
    for _op in (pickle.INST, pickle.OBJ, pickle.EXT1, pickle.EXT2, pickle.EXT4, pickle.PERSID):
        dispatch[_op[0]] = _refuse

    def load(self):
        result = super().load()
        check_structure(result)
        return result


def check_structure(obj: Any, max_depth: int = MAX_DEPTH) -> None:
    """Refuse results nested deeper than ``max_depth`` (walked iteratively, each object once: a DAG)."""
    seen: set[int] = set()
    todo = [(obj, 0)]
    while todo:
        o, d = todo.pop()
        if id(o) in seen:
            continue
        if d > max_depth:
            raise UnsafeCheckpointError(f"containers nested more than {max_depth} deep")
        if isinstance(o, (dict, list, tuple, set, frozenset)) or isinstance(o, (argparse.Namespace, StandIn,
                                                                                types.SimpleNamespace)):
            seen.add(id(o))
            if isinstance(o, (dict, list, tuple, set, frozenset)) and len(o) > MAX_ITEMS:
                raise UnsafeCheckpointError(f"a container of {len(o)} entries (more than any real checkpoint's "
                                            f"{MAX_ITEMS})")
            if isinstance(o, dict):
                items = list(o.keys()) + list(o.values())
            elif isinstance(o, (list, tuple, set, frozenset)):
                items = list(o)
            else:
                items = list(vars(o).values())
            todo.extend((x, d + 1) for x in items)


def loads(data: bytes, **kw) -> Any:
    """Unpickle ``data`` under the policy."""
    import io

    return SafeUnpickler(io.BytesIO(data), **kw).load()
