"""The one unpickling policy (frontends/megatron/unpickle.py, safe_load.py): what real saves hold loads, inert;
what could run code or lie about its size is refused with a line naming the file."""

from __future__ import annotations

import argparse
import io
import pickle
import signal
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from mexc.errors import CheckpointError, UnsafeCheckpointError
from mexc.frontends.megatron import safe_load, unpickle


def _save(obj, path: Path, **kw) -> Path:
    torch.save(obj, path, **kw)
    return path


def _global(module: str, name: str, proto: int = 4) -> bytes:
    """A pickle that pushes ``module.name`` (STACK_GLOBAL for proto 4, GLOBAL otherwise) and returns it."""
    if proto >= 4:
        m, n = module.encode(), name.encode()
        return (b"\x80\x04" + b"\x8c" + bytes([len(m)]) + m + b"\x8c" + bytes([len(n)]) + n + b"\x93" + b".")
    return b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\n."


def _call(module: str, name: str, arg: str) -> bytes:
    a = arg.encode()
    return _global(module, name)[:-1] + b"\x8c" + bytes([len(a)]) + a + b"\x85R."


@pytest.mark.parametrize("module,name", [
    ("torch.distributed.checkpoint.metadata", "os.system"),       # dotted name through an allowed module
    ("torch.distributed.checkpoint.filesystem", "pickle.loads"),
    ("os", "system"), ("builtins", "eval"), ("builtins", "getattr"), ("posix", "system"),
    ("argparse", "Namespace.__init__"), ("torch._utils", "_rebuild_tensor_v2.__globals__"),
    ("numpy", "load"), ("subprocess", "Popen"),
])
def test_names_outside_the_policy_are_refused(module, name, tmp_path):
    canary = tmp_path / "canary"
    for data in (_global(module, name), _global(module, name, proto=2), _call(module, name, f"touch {canary}")):
        with pytest.raises(UnsafeCheckpointError) as e:
            unpickle.loads(data)
        assert name in e.value.message
    assert not canary.exists()


def test_code_running_opcodes_are_refused():
    inst = b"(iargparse\nNamespace\n."       # INST: protocol-0 construction
    ext = b"\x80\x02\x82\x01."                # EXT1
    persid = b"Pfoo\n."                       # text persistent id
    for data in (inst, ext, persid):
        with pytest.raises(UnsafeCheckpointError):
            unpickle.loads(data)


def test_reduce_needs_a_callable_the_policy_gave():
    # BUILD on a plain dict / REDUCE of a value that is not from the policy
    with pytest.raises(UnsafeCheckpointError):
        unpickle.loads(b"\x80\x02}q\x00}b.")  # BUILD on a dict


def test_what_real_megatron_args_hold_loads_inert(tmp_path):
    import pathlib
    import types

    args = argparse.Namespace(exit_signal=signal.SIGTERM, params_dtype=torch.bfloat16, save=pathlib.PosixPath("/x/y"),
                              extra=types.SimpleNamespace(a=1), s={1, 2}, data=b"\x00\x01", sl=slice(1, 2))
    sd = {"args": args, "rng_state": [{"np_rng_state": np.random.get_state()}],
          "model": {"w": torch.arange(6.0).reshape(2, 3), "_extra_state": io.BytesIO(b"te1")}}
    f = _save(sd, tmp_path / "m.pt")
    got = safe_load.torch_load(f)
    a = got["args"]
    assert a.exit_signal == 15 and a.exit_signal.value == 15 and "Signals" in repr(a.exit_signal)
    assert a.params_dtype is torch.bfloat16 and a.save == "/x/y" and a.extra.a == 1 and a.s == {1, 2}
    assert a.data == b"\x00\x01" and a.sl == slice(1, 2)
    assert torch.equal(got["model"]["w"], torch.arange(6.0).reshape(2, 3))
    assert isinstance(got["model"]["_extra_state"], unpickle.StandIn)
    assert isinstance(got["rng_state"][0]["np_rng_state"][1], unpickle.NumpyStandIn)  # never allocated


def test_megatron_classes_of_any_version_become_stand_ins():
    data = _call("megatron.core.transformer.enums", "SomeFutureEnum", "x")
    obj = unpickle.loads(data)
    assert isinstance(obj, unpickle.StandIn) and obj.qualname.endswith("SomeFutureEnum") and obj.value == "x"


def test_numpy_object_arrays_are_refused(tmp_path):
    f = _save({"x": np.array([1, "a"], dtype=object)}, tmp_path / "o.pt")
    with pytest.raises(UnsafeCheckpointError) as e:
        safe_load.torch_load(f)
    assert str(f) in e.value.message and "object" in e.value.message


def test_bytearray_of_a_declared_size_is_refused():
    data = _global("builtins", "bytearray", proto=2)[:-1] + b"J\x00\x00\x00\x40\x85R."  # bytearray(2**30)
    with pytest.raises(UnsafeCheckpointError):
        unpickle.loads(data)


def test_deep_nesting_is_refused_and_shared_structures_are_cheap():
    deep = []
    cur = deep
    for _ in range(150):
        cur.append([])
        cur = cur[0]
    with pytest.raises(UnsafeCheckpointError):
        unpickle.loads(pickle.dumps(deep, protocol=2))
    shared = [0] * 10
    for _ in range(60):  # 2**60 paths through a DAG of 60 nodes: walked once each
        shared = [shared, shared]
    assert unpickle.loads(pickle.dumps(shared, protocol=4))


def test_expand_views_and_out_of_storage_views_are_refused(tmp_path):
    f = _save({"x": torch.zeros(4).expand(1 << 20, 4)}, tmp_path / "e.pt")
    with pytest.raises(CheckpointError) as e:
        safe_load.torch_load(f)
    assert str(f) in e.value.message and "overlap" in e.value.message
    ok = _save({"t": torch.arange(12.0).reshape(3, 4).t(), "n": torch.arange(10.0)[2:5]}, tmp_path / "ok.pt")
    got = safe_load.torch_load(ok)
    assert torch.equal(got["t"], torch.arange(12.0).reshape(3, 4).t()) and torch.equal(got["n"], torch.tensor([2., 3, 4]))


def _rewrite_zip(src: Path, dst: Path, edit) -> Path:
    with zipfile.ZipFile(src) as z, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as out:
        for zi in z.infolist():
            data = edit(zi.filename, z.read(zi))
            if data is not None:
                out.writestr(zi.filename, data)
    return dst


def test_a_storage_record_shorter_than_declared_is_refused(tmp_path):
    f = _save({"x": torch.arange(1000.0)}, tmp_path / "a.pt")
    bad = _rewrite_zip(f, tmp_path / "b.pt", lambda n, d: d[:100] if "/data/" in n and not n.endswith(".pkl") else d)
    with pytest.raises(CheckpointError) as e:
        safe_load.torch_load(bad)
    assert str(bad) in e.value.message and "declares" in e.value.message


def test_compressed_records_are_refused(tmp_path):
    f = _save({"x": torch.zeros(100)}, tmp_path / "a.pt")
    bad = tmp_path / "c.pt"
    with zipfile.ZipFile(f) as z, zipfile.ZipFile(bad, "w", zipfile.ZIP_DEFLATED) as out:
        for zi in z.infolist():
            out.writestr(zi.filename, z.read(zi))
    with pytest.raises(CheckpointError) as e:
        safe_load.torch_load(bad)
    assert "compressed" in e.value.message


def test_legacy_format_validates_storage_lengths(tmp_path):
    f = _save({"x": torch.arange(64.0)}, tmp_path / "l.pt", _use_new_zipfile_serialization=False)
    assert torch.equal(safe_load.torch_load(f)["x"], torch.arange(64.0))
    data = f.read_bytes()
    short = tmp_path / "s.pt"
    short.write_bytes(data[:-100])
    with pytest.raises(CheckpointError) as e:
        safe_load.torch_load(short)
    assert str(short) in e.value.message


def test_a_fifo_is_refused_without_blocking(tmp_path):
    import os

    p = tmp_path / "fifo.pt"
    os.mkfifo(p)
    with pytest.raises(CheckpointError) as e:
        safe_load.torch_load(p)
    assert "not a regular file" in e.value.message
