"""The metadata mutator: what a checkpoint *declares* (sizes, offsets, lengths, shapes, chunk tilings, paths,
storages, views, rank layouts) made to lie, on copies of the real bases of :mod:`hostile.carriers`.

A :class:`Mutation` changes one thing of one base. Torch_dist mutations edit the DCP ``.metadata`` as objects
(``pickle.load`` of our own base, edit, ``pickle.dump``): ``storage_data`` maps ``MetadataIndex(fqn, offset)``
to ``_StorageInfo(relative_path, offset, length)``; a tensor's ``TensorStorageMetadata`` has ``size`` and the
``chunks`` (``ChunkStorageMetadata(offsets, sizes)``) that must tile it (PyTorch
``torch/distributed/checkpoint/metadata.py``). Legacy mutations edit ``model_optim_rng.pt``: its records, the
storage sizes its pickle declares (persistent ids ``('storage', type, key, location, numel)``, PyTorch
``torch/serialization.py``), tensor views, the args, and the ``mp_rank_*`` directories.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import pickletools
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from . import pickles
from .carriers import ITER, read_metadata, write_metadata, write_zip, zip_records

TP_TENSOR = "embedding.word_embeddings.weight"  # two chunks (TP=2) in the 0.16.1 torch_dist fixture
RANK0 = f"{ITER}/mp_rank_00/model_optim_rng.pt"
RANK1 = f"{ITER}/mp_rank_01/model_optim_rng.pt"


@dataclass(frozen=True)
class Mutation:
    id: str
    base: str
    apply: Callable[[Path, Path], None]       # (checkpoint copy, the case's scratch directory)
    names: tuple[str, ...]                    # what the error may name (any one)
    refuse: bool = True                       # False: accepting it is right too (no hang, crash, trace)
    inspect_refuses: bool = True              # False: only reading tensor bytes can see the lie (inspect may pass)


# ------------------------------------------------------------------------------------------ torch_dist


def _storage(fqn: str = TP_TENSOR, which: int = 0):
    def get(md):
        keys = sorted((k for k in md.storage_data if k.fqn == fqn), key=lambda k: tuple(k.offset or ()))
        return keys[which], md.storage_data[keys[which]]
    return get


def set_info(field: str, value, which: int = 0) -> Callable[[Path, Path], None]:
    """Set ``field`` (offset, length, relative_path) of one chunk's ``_StorageInfo``; ``value`` may be a
    function of (checkpoint, scratch dir, current info)."""
    def apply(ckpt: Path, scratch: Path) -> None:
        md = read_metadata(ckpt)
        idx, info = _storage(which=which)(md)
        v = value(ckpt, scratch, info) if callable(value) else value
        md.storage_data[idx] = dataclasses.replace(info, **{field: v})
        write_metadata(ckpt, md)
    return apply


def edit(fn: Callable) -> Callable[[Path, Path], None]:
    """Apply ``fn(metadata)`` (it edits in place)."""
    def apply(ckpt: Path, scratch: Path) -> None:
        md = read_metadata(ckpt)
        fn(md)
        write_metadata(ckpt, md)
    return apply


def set_chunks(fn: Callable[[list], list], fqn: str = TP_TENSOR) -> Callable[[Path, Path], None]:
    """Replace the tensor's chunk list by ``fn([(offsets, sizes, info), ...])``, keeping ``storage_data``
    consistent (one storage item per chunk, keyed by its offsets)."""
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex

    def apply(ckpt: Path, scratch: Path) -> None:
        md = read_metadata(ckpt)
        tmd = md.state_dict_metadata[fqn]
        old = sorted(((tuple(c.offsets), tuple(c.sizes)) for c in tmd.chunks))
        infos = {tuple(k.offset): v for k, v in md.storage_data.items() if k.fqn == fqn}
        for k in [k for k in md.storage_data if k.fqn == fqn]:
            del md.storage_data[k]
        new = fn([(o, sz, infos[o]) for o, sz in old])
        tmd.chunks = [ChunkStorageMetadata(offsets=torch.Size(o), sizes=torch.Size(sz)) for o, sz, _ in new]
        for n, (o, _, info) in enumerate(new):
            md.storage_data[MetadataIndex(fqn, torch.Size(o), n)] = info
        write_metadata(ckpt, md)
    return apply


def _size_of(field: str, delta: int):
    return lambda ckpt, scratch, info: getattr(info, field) + delta


def _file_size(ckpt, scratch, info):
    return (ckpt / ITER / info.relative_path).stat().st_size


def _outside_copy(ckpt: Path, scratch: Path, info) -> Path:
    """A valid copy of the chunk's file outside the checkpoint (reading it would 'work')."""
    out = scratch / "outside"
    out.mkdir(exist_ok=True)
    shutil.copy(ckpt / ITER / info.relative_path, out / info.relative_path)
    return out / info.relative_path


def _symlink_to(target: Callable[[Path, Path, object], str], name: str = "link.distcp"):
    def value(ckpt, scratch, info):
        os.symlink(target(ckpt, scratch, info), ckpt / ITER / name)
        return name
    return value


def _fifo(ckpt, scratch, info):
    os.mkfifo(ckpt / ITER / "fifo.distcp")
    return "fifo.distcp"


def _directory(ckpt, scratch, info):
    (ckpt / ITER / "dir.distcp").mkdir()
    return "dir.distcp"


def _dtype(dt):
    def fn(md):
        p = md.state_dict_metadata[TP_TENSOR].properties
        md.state_dict_metadata[TP_TENSOR].properties = dataclasses.replace(p, dtype=dt)
    return fn


def _size(size):
    def fn(md):
        md.state_dict_metadata[TP_TENSOR].size = torch.Size(size) if all(isinstance(x, int) and x >= 0
                                                                         for x in size) else size
    return fn


def _gap(chunks):
    return chunks[:1]


def _overlap(chunks):
    (o0, s0, i0), (o1, s1, i1) = chunks
    return [(o0, s0, i0), (o0, s1, i1)]  # both cover the first half; the second half is never written


def _shrink(chunks):
    (o0, s0, i0), rest = chunks[0], chunks[1:]
    return [(o0, (s0[0] - 1, *s0[1:]), i0), *rest]


def _grow(chunks):
    (o0, s0, i0), (o1, s1, i1) = chunks
    return [(o0, s0, i0), (o1, (s1[0] * 2, *s1[1:]), i1)]  # runs past the tensor's end


def _dup(chunks):
    return [*chunks, chunks[0]]


def _chunk_off(off):
    def fn(chunks):
        (o0, s0, i0), rest = chunks[0], chunks[1:]
        return [(off, s0, i0), *rest]
    return fn


MD = ".metadata"
DIST = (".metadata", ".distcp")

DIST_MUTATIONS = [
    *(Mutation(f"offset={v}", "dist", set_info("offset", v), DIST) for v in (-1, -(2 ** 62), 2 ** 62, 2 ** 64 + 5)),
    Mutation("offset=filesize", "dist", set_info("offset", _file_size), DIST),
    # a window one byte late still holds the whole zip (zipfile corrects for it): reading it gives the right bytes
    Mutation("offset+1", "dist", set_info("offset", _size_of("offset", 1)), DIST, refuse=False),
    Mutation("offset='0'", "dist", set_info("offset", "0"), DIST),
    *(Mutation(f"length={v}", "dist", set_info("length", v), DIST) for v in (-1, 0, 2 ** 62, 2 ** 64)),
    Mutation("length-1", "dist", set_info("length", _size_of("length", -1)), DIST, inspect_refuses=False),
    Mutation("length=None", "dist", set_info("length", None), DIST),
    Mutation("path=/etc/passwd", "dist", set_info("relative_path", "/etc/passwd"), (*DIST, "/etc/passwd")),
    Mutation("path=absolute-copy-outside", "dist",
             set_info("relative_path", lambda c, s, i: str(_outside_copy(c, s, i))), (*DIST, "outside")),
    Mutation("path=../copy-outside", "dist", set_info(
        "relative_path", lambda c, s, i: os.path.relpath(_outside_copy(c, s, i), c / ITER)), (*DIST, "..")),
    Mutation("path=symlink-outside", "dist",
             set_info("relative_path", _symlink_to(lambda c, s, i: str(_outside_copy(c, s, i)))), (*DIST, "link")),
    Mutation("path=symlink-/dev/zero", "dist", set_info("relative_path", _symlink_to(lambda c, s, i: "/dev/zero")),
             (*DIST, "link")),
    *(Mutation(f"path={p}", "dist", set_info("relative_path", p), (*DIST, p))
      for p in ("/dev/zero", "/dev/urandom", "/proc/self/mem", "", ".", "..", "x\0y", "a" * 5000)),
    Mutation("path=FIFO", "dist", set_info("relative_path", _fifo), (*DIST, "fifo")),
    Mutation("path=directory", "dist", set_info("relative_path", _directory), (*DIST, "dir.distcp")),
    Mutation("path=int", "dist", set_info("relative_path", 5), DIST),
    Mutation("chunks: gap", "dist", set_chunks(_gap), DIST),
    Mutation("chunks: overlap", "dist", set_chunks(_overlap), DIST),
    Mutation("chunks: shrunk", "dist", set_chunks(_shrink), DIST),
    Mutation("chunks: past the end", "dist", set_chunks(_grow), DIST),
    Mutation("chunks: duplicate", "dist", set_chunks(_dup), DIST),
    *(Mutation(f"chunk offsets={o}", "dist", set_chunks(_chunk_off(o)), DIST)
      for o in ((-64, 0), (2 ** 62, 0), (0,), (0, 0, 0))),
    *(Mutation(f"size={sz}", "dist", edit(_size(sz)), DIST)
      for sz in ((256, 64), (2 ** 62, 64), (128,), (128, 64, 1), (0, 64), (-128, 64))),
    Mutation("dtype=float64", "dist", edit(_dtype(torch.float64)), DIST),
    Mutation("dtype=float16", "dist", edit(_dtype(torch.float16)), DIST, inspect_refuses=False),
    Mutation("dtype=bfloat16", "dist", edit(_dtype(torch.bfloat16)), DIST, inspect_refuses=False),
    Mutation("properties=None", "dist", edit(lambda md: setattr(md.state_dict_metadata[TP_TENSOR], "properties", None)),
             DIST),
    Mutation("storage_data=list", "dist", edit(lambda md: setattr(md, "storage_data", list(md.storage_data.values()))),
             DIST),
    Mutation("state_dict_metadata=None", "dist", edit(lambda md: setattr(md, "state_dict_metadata", None)), DIST),
    Mutation("metadata=dict", "dist", lambda c, s: (c / ITER / MD).write_bytes(pickle.dumps({"a": 1})), DIST),
    Mutation(".metadata=FIFO", "dist", lambda c, s: ((c / ITER / MD).unlink(), os.mkfifo(c / ITER / MD)), DIST),
    Mutation(".metadata->/dev/zero", "dist", lambda c, s: ((c / ITER / MD).unlink(), os.symlink("/dev/zero", c / ITER / MD)),
             DIST),
    Mutation(".metadata=empty", "dist", lambda c, s: (c / ITER / MD).write_bytes(b""), DIST),
    Mutation("common.pt=FIFO", "dist", lambda c, s: ((c / ITER / "common.pt").unlink(),
                                                     os.mkfifo(c / ITER / "common.pt")), ("common.pt",)),
    Mutation("metadata.json=list", "dist", lambda c, s: (c / ITER / "metadata.json").write_text("[1]"),
             ("metadata.json",)),
    Mutation("metadata.json=deep", "dist", lambda c, s: (c / ITER / "metadata.json").write_text("[" * 100000),
             ("metadata.json",)),
]


# ------------------------------------------------------------------------------------------ legacy


def _rank_state(ckpt: Path, rel: str = RANK0) -> dict:
    return torch.load(ckpt / rel, map_location="cpu", weights_only=False)  # our own base: trusted


def _save(ckpt: Path, sd: dict, rel: str = RANK0) -> None:
    (ckpt / rel).unlink()
    torch.save(sd, ckpt / rel)


def set_arg(name: str, value, rel: str = RANK0) -> Callable[[Path, Path], None]:
    def apply(ckpt: Path, scratch: Path) -> None:
        sd = _rank_state(ckpt, rel)
        setattr(sd["args"], name, value)
        _save(ckpt, sd, rel)
    return apply


def set_key(key: str, value) -> Callable[[Path, Path], None]:
    def apply(ckpt: Path, scratch: Path) -> None:
        sd = _rank_state(ckpt)
        if value is KeyError:
            del sd[key]
        else:
            sd[key] = value
        _save(ckpt, sd)
    return apply


def _record(fn: Callable[[bytes], bytes], record: str = "data/0", rel: str = RANK0):
    def apply(ckpt: Path, scratch: Path) -> None:
        rec = zip_records(ckpt / rel)
        rec[record] = fn(rec[record])
        write_zip(ckpt / rel, rec)
    return apply


def storage_numel(factor: float, rel: str = RANK0) -> Callable[[Path, Path], None]:
    """Scale the numel that every storage's persistent id in ``data.pkl`` declares (the records stay)."""
    def apply(ckpt: Path, scratch: Path) -> None:
        rec = zip_records(ckpt / rel)
        data = pickles.unframe(rec["data.pkl"])
        ops = list(pickletools.genops(data))
        out, last = bytearray(), 0
        for n, (op, arg, pos) in enumerate(ops):
            if op.name.endswith("UNICODE") and arg == "storage":
                # ('storage', type, key, location, numel): the fifth field, skipping memo puts
                fields = [k for k in range(n, n + 12) if "PUT" not in ops[k][0].name and ops[k][0].name != "MEMOIZE"]
                k = fields[4]
                assert ops[k][0].name.startswith("BININT"), ops[k]
                out += data[last:ops[k][2]] + pickles.i(max(1, int(ops[k][1] * factor)))
                last = ops[k + 1][2]
        out += data[last:]
        rec["data.pkl"] = bytes(out)
        write_zip(ckpt / rel, rec)
    return apply


def _model_key(sd: dict, part: str) -> str:
    return next(k for k in sd["model"] if part in k and isinstance(sd["model"][k], torch.Tensor))


def expand_views(huge: bool) -> Callable[[Path, Path], None]:
    """Embedding and output layer saved as stride-0 ``expand()`` views of one element: the right shape, or
    (``huge``) 2**30 rows per rank with args that agree (padded_vocab_size = 2**31)."""
    def apply(ckpt: Path, scratch: Path) -> None:
        for rel in (RANK0, RANK1):
            sd = _rank_state(ckpt, rel)
            for part in ("word_embeddings", "output_layer"):
                k = _model_key(sd, part)
                t = sd["model"][k]
                rows = 2 ** 30 if huge else t.shape[0]
                sd["model"][k] = torch.zeros(1, dtype=t.dtype).expand(rows, *t.shape[1:])
            if huge:
                sd["args"].padded_vocab_size = 2 ** 31
                sd["args"].vocab_size = 2 ** 31
            _save(ckpt, sd, rel)
    return apply


def _twin_rank_dir(name: str):
    def apply(ckpt: Path, scratch: Path) -> None:
        shutil.copytree(ckpt / ITER / "mp_rank_00", ckpt / ITER / name)
    return apply


def _replace_file(rel: str, how: str):
    def apply(ckpt: Path, scratch: Path) -> None:
        f = ckpt / rel
        if how == "fifo":
            f.unlink()
            os.mkfifo(f)
        elif how == "dir":
            f.unlink()
            f.mkdir()
        elif how == "/dev/zero":
            f.unlink()
            os.symlink("/dev/zero", f)
        elif how == "outside":
            out = scratch / "outside"
            out.mkdir(exist_ok=True)
            shutil.move(f, out / f.name)
            os.symlink(out / f.name, f)
        elif how == "half":
            os.truncate(f, f.stat().st_size // 2)
        elif how == "empty":
            os.truncate(f, 0)
    return apply


def _iter_outside(ckpt: Path, scratch: Path) -> None:
    """``iter_0000010`` -> a real iteration directory elsewhere (the rank files would be read from outside)."""
    shutil.move(ckpt / ITER, scratch / "outside-iter")
    os.symlink(scratch / "outside-iter", ckpt / ITER)


R0 = ("mp_rank_00/model_optim_rng.pt",)
R1 = ("mp_rank_01/model_optim_rng.pt",)
TRACKER = ("latest_checkpointed_iteration.txt",)


def _tracker(text: str | None):
    def apply(ckpt: Path, scratch: Path) -> None:
        f = ckpt / "latest_checkpointed_iteration.txt"
        f.unlink()
        if text is None:
            os.mkfifo(f)
        else:
            f.write_text(text)
    return apply


LEGACY_MUTATIONS = [
    Mutation("record shorter than declared", "legacy", _record(lambda b: b[: len(b) // 2]), R0),
    Mutation("record empty", "legacy", _record(lambda b: b""), R0),
    Mutation("record shorter (rank 1)", "legacy", _record(lambda b: b[: len(b) // 2], rel=RANK1), R1),
    Mutation("storages declare 1000x their records", "legacy", storage_numel(1000), R0),
    Mutation("storages declare 2^40 elements", "legacy", storage_numel(2 ** 40), R0),
    Mutation("storages declare 1 element", "legacy", storage_numel(1e-9), R0),
    Mutation("stride-0 expand() views", "legacy", expand_views(huge=False), R0),
    Mutation("stride-0 expand() views of 2^30 rows", "legacy", expand_views(huge=True), R0),
    Mutation("two directories for rank 0", "legacy", _twin_rank_dir("mp_rank_00_000"), ("mp_rank_00_000",)),
    Mutation("two directories for rank 0 (pp suffix)", "legacy", _twin_rank_dir("mp_rank_00_000_000"),
             ("mp_rank_00_000_000",)),
    *(Mutation(f"args.{n}={v!r}", "legacy", set_arg(n, v), (*R0, n)) for n, v in (
        ("tensor_model_parallel_size", 10 ** 9), ("tensor_model_parallel_size", 0),
        ("tensor_model_parallel_size", -2), ("tensor_model_parallel_size", "2"),
        ("tensor_model_parallel_size", 2.5), ("pipeline_model_parallel_size", 10 ** 9),
        ("expert_model_parallel_size", 10 ** 9), ("num_layers", 10 ** 12), ("num_layers", -1),
        ("hidden_size", -64), ("hidden_size", 10 ** 12), ("num_attention_heads", 0),
        ("padded_vocab_size", -1), ("ffn_hidden_size", 10 ** 15), ("num_query_groups", 3),
        ("params_dtype", "os.system"), ("params_dtype", "x\nhint: a second line the checkpoint wrote"))),
    # values mexc may take as "unset" or pass through to config.json: accepting them is not wrong
    *(Mutation(f"args.{n}={v!r}", "legacy", set_arg(n, v), (*R0, n), refuse=False) for n, v in (
        ("seq_length", 10 ** 18), ("kv_channels", 0))),
    Mutation("args=list", "legacy", set_key("args", [1, 2]), R0),
    Mutation("args missing", "legacy", set_key("args", KeyError), (*R0, ITER)),
    Mutation("model=list", "legacy", set_key("model", [torch.zeros(2)]), R0),
    Mutation("iteration directory is a symlink outside", "legacy", _iter_outside, (ITER,)),
    *(Mutation(f"rank 1 file: {how}", "legacy", _replace_file(RANK1, how), R1)
      for how in ("fifo", "dir", "/dev/zero", "outside", "half", "empty")),
    *(Mutation(f"tracker={t!r}", "legacy", _tracker(t), TRACKER)
      for t in ("../../etc", "9" * 40, "-5", "x" * 5_000_000)),
    # a FIFO tracker must not block; skipping it for the one iteration directory there is is right too
    Mutation("tracker=FIFO", "legacy", _tracker(None), TRACKER, refuse=False),
]

MUTATIONS = [*DIST_MUTATIONS, *LEGACY_MUTATIONS]
