"""Real Megatron checkpoints with a payload put in one of their pickles.

Bases (made once per session, copied per case; :func:`make_bases`):

* ``legacy``: ``examples/llama-tiny`` (megatron-core 0.16.1, legacy ``torch`` format, TP=2) with what a training
  save also holds and the example lacks: ``optimizer`` (Adam state, fp32 copies), ``opt_param_scheduler`` and
  ``rng_state`` (``random``/numpy/torch generator states, as Megatron-LM's ``get_rng_state`` saves them);
* ``dist``: the megatron-core torch_dist fixture (``tests/megatron_fixtures.py``: 0.16.1, TP=2, ``common.pt``, two
  chunks per TP-split tensor);
* ``dist019``: ``tests/data/mcore-0.19.2/llama-tp1`` (the common state is the bytes item ``common_state`` inside
  the ``.distcp`` file).

A *carrier* names one pickle of a base (:data:`CARRIERS`): where it is, which base, which string keys its data
has (for ``inside``), and which path fragments an error about it must name.
"""

from __future__ import annotations

import pickle
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import pickles

REPO = Path(__file__).resolve().parents[2]
ITER = "iter_0000010"


# ------------------------------------------------------------------------------------------ torch.save zips


def zip_records(path: Path) -> dict[str, bytes]:
    """The records of a ``torch.save`` zip (names without the archive's prefix), read with torch's own reader."""
    r = torch._C.PyTorchFileReader(str(path))
    return {n: r.get_record(n) for n in r.get_all_records()}


def write_zip(path: Path, records: dict[str, bytes]) -> None:
    """Write ``records`` as a ``torch.save`` zip with torch's own writer (aligned records, its own version and
    serialization id); the archive prefix is the file's stem, as torch.save names it."""
    path = Path(path)
    path.unlink(missing_ok=True)
    w = torch._C.PyTorchFileWriter(str(path))
    for name, data in records.items():
        if name not in ("version", ".data/serialization_id"):
            w.write_record(name, data, len(data))
    w.write_end_of_file()


def zip_bytes(records: dict[str, bytes], stem: str = "item") -> bytes:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / f"{stem}.pt"
        write_zip(p, records)
        return p.read_bytes()


def legacy_pickles(data: bytes) -> list[bytes]:
    """Split a pre-1.6 ``torch.save`` file into its pickles (magic, protocol, sys info, data, storage keys) and
    the raw storage bytes (last element)."""
    out, pos = [], 0
    for _ in range(5):
        end = pos
        for op, _, p in pickles.pickletools.genops(data[pos:]):
            end = pos + p + 1
        out.append(data[pos:end])
        pos = end
    out.append(data[pos:])
    return out


# ------------------------------------------------------------------------------------------ bases


def _training_extras(sd: dict) -> None:
    """What a Megatron-LM training save adds to the model (``optimizer``, scheduler, ``rng_state``)."""
    params = [t for t in sd["model"].values() if isinstance(t, torch.Tensor) and t.is_floating_point()][:3]
    state = {n: {"step": torch.tensor(10.0), "exp_avg": torch.zeros_like(p, dtype=torch.float32),
                 "exp_avg_sq": torch.zeros_like(p, dtype=torch.float32)} for n, p in enumerate(params)}
    sd["optimizer"] = {"optimizer": {"state": state, "param_groups": [
        {"lr": 1e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1, "params": list(range(len(params)))}]},
        "fp32_from_fp16_params": [[p.float() for p in params]]}
    sd["opt_param_scheduler"] = {"max_lr": 1e-4, "min_lr": 1e-5, "num_steps": 10, "warmup_steps": 2,
                                 "decay_style": "cosine"}
    rs = np.random.RandomState(1234)
    rnd = random.Random(1234)
    sd["rng_state"] = [{"random_rng_state": rnd.getstate(), "np_rng_state": rs.get_state(),
                        "torch_rng_state": torch.get_rng_state(), "cuda_rng_state": torch.get_rng_state(),
                        "rng_tracker_states": {}}]


def _legacy_base(dst: Path) -> Path:
    shutil.copytree(REPO / "examples" / "llama-tiny", dst, ignore=shutil.ignore_patterns("reference.pt"))
    for rank in ("mp_rank_00", "mp_rank_01"):
        f = dst / ITER / rank / "model_optim_rng.pt"
        sd = torch.load(f, map_location="cpu", weights_only=False)  # the repository's own example: trusted
        _training_extras(sd)
        f.unlink()
        torch.save(sd, f)
    f = dst / ITER / "mp_rank_01" / "model_optim_rng.pt"  # a pre-1.6 (non-zip) save of rank 1, for that carrier
    sd = torch.load(f, map_location="cpu", weights_only=False)
    torch.save(sd, dst / "rank1-nonzip.pt", _use_new_zipfile_serialization=False)
    return dst


def make_bases(root: Path, dist_fixture: Path) -> dict[str, Path]:
    """The three bases under ``root`` (``dist_fixture``: the torch_dist fixture's ``ckpt`` directory)."""
    root.mkdir(parents=True, exist_ok=True)
    bases = {"legacy": _legacy_base(root / "legacy")}
    shutil.copytree(dist_fixture, root / "dist")
    shutil.copytree(REPO / "tests" / "data" / "mcore-0.19.2" / "llama-tp1" / "ckpt", root / "dist019")
    bases["dist"], bases["dist019"] = root / "dist", root / "dist019"
    return bases


def copy_base(bases: dict[str, Path], base: str, dst: Path) -> Path:
    """A private copy of a base (call :func:`finish` once it is mutated)."""
    shutil.copytree(bases[base], dst, symlinks=True)
    return dst


# ------------------------------------------------------------------------------------------ DCP helpers


def read_metadata(ckpt: Path):
    """The ``.metadata`` of a base we made (trusted): plain ``pickle.load``."""
    with open(ckpt / ITER / ".metadata", "rb") as f:
        return pickle.load(f)


def write_metadata(ckpt: Path, md) -> None:
    (ckpt / ITER / ".metadata").write_bytes(pickle.dumps(md, protocol=pickle.HIGHEST_PROTOCOL))


def item(md, fqn_prefix: str):
    """(MetadataIndex, _StorageInfo) of the first storage item whose fqn starts with ``fqn_prefix``."""
    return next((k, v) for k, v in md.storage_data.items() if k.fqn.startswith(fqn_prefix))


def replace_item(ckpt: Path, fqn_prefix: str, data: bytes) -> None:
    """Append ``data`` to the item's ``.distcp`` file and point the item's storage info at it."""
    import dataclasses

    md = read_metadata(ckpt)
    idx, info = item(md, fqn_prefix)
    f = ckpt / ITER / info.relative_path
    offset = f.stat().st_size
    with open(f, "ab") as out:
        out.write(data)
    md.storage_data[idx] = dataclasses.replace(info, offset=offset, length=len(data))
    write_metadata(ckpt, md)


def item_bytes(ckpt: Path, fqn_prefix: str) -> bytes:
    _, info = item(read_metadata(ckpt), fqn_prefix)
    with open(ckpt / ITER / info.relative_path, "rb") as f:
        f.seek(info.offset)
        return f.read(info.length)


def item_records(ckpt: Path, fqn_prefix: str) -> dict[str, bytes]:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "item.pt"
        p.write_bytes(item_bytes(ckpt, fqn_prefix))
        return zip_records(p)


# ------------------------------------------------------------------------------------------ carriers


@dataclass(frozen=True)
class Carrier:
    """One pickle of a base: ``keys`` are string keys of its data (``inside`` targets), ``names`` the path
    fragments an error about it names (any one), ``unread``: mexc has no reason to unpickle it (a refusal is
    allowed, not required; the canary never)."""

    id: str
    base: str
    keys: tuple[str, ...]
    names: tuple[str, ...]
    protocol: int = 2
    unread: bool = False


CARRIERS = [
    Carrier("rank0", "legacy", ("args", "optimizer", "rng_state", "model"), ("mp_rank_00/model_optim_rng.pt",)),
    Carrier("rank1", "legacy", ("args", "optimizer", "rng_state", "model"), ("mp_rank_01/model_optim_rng.pt",)),
    Carrier("rank1-nonzip", "legacy", ("args", "optimizer", "rng_state", "model"), ("mp_rank_01/model_optim_rng.pt",)),
    Carrier("common.pt", "dist", ("args", "content_metadata"), ("common.pt",)),
    Carrier(".metadata", "dist019", ("state_dict_metadata", "storage_data"), (".metadata",), protocol=4),
    Carrier("common_state", "dist019", ("args",), ("common_state", "__0_0.distcp")),
    Carrier("tensor-chunk", "dist019", ("model",), ("__0_0.distcp", "output_layer"), unread=True),
    Carrier("extra_state", "dist019", ("model",), ("__0_0.distcp", "_extra_state"), unread=True),
]
CARRIER = {c.id: c for c in CARRIERS}


def put(ckpt: Path, carrier: Carrier, payload: pickles.Payload, where: str, key: str | None = None) -> None:
    """Put ``payload`` in ``carrier``'s pickle of the copied base ``ckpt`` (``where``: before/inside/after)."""

    def patch(data: bytes) -> bytes:
        k = key if key in carrier.keys else carrier.keys[0]
        if where == "inside" and carrier.id in ("tensor-chunk", "extra_state"):
            return pickles.inject(data, payload, "after")  # a chunk's pickle has no string keys to nest in
        return pickles.inject(data, payload, where, k)

    transform(ckpt, carrier, patch)


def transform(ckpt: Path, carrier: Carrier, patch) -> None:
    """Replace ``carrier``'s pickle in the copied base ``ckpt`` by ``patch(pickle bytes)``."""
    it = ckpt / ITER
    if carrier.id in ("rank0", "rank1"):
        f = it / f"mp_rank_0{carrier.id[-1]}" / "model_optim_rng.pt"
        rec = zip_records(f)
        rec["data.pkl"] = patch(rec["data.pkl"])
        write_zip(f, rec)
    elif carrier.id == "rank1-nonzip":
        parts = legacy_pickles((ckpt / "rank1-nonzip.pt").read_bytes())
        parts[3] = patch(parts[3])
        (it / "mp_rank_01" / "model_optim_rng.pt").write_bytes(b"".join(parts))
    elif carrier.id == "common.pt":
        rec = zip_records(it / "common.pt")
        rec["data.pkl"] = patch(rec["data.pkl"])
        write_zip(it / "common.pt", rec)
    elif carrier.id == ".metadata":
        f = it / ".metadata"
        f.write_bytes(patch(f.read_bytes()))
    else:
        fqn = {"common_state": "common_state", "tensor-chunk": "output_layer.weight",
               "extra_state": "decoder.layers.self_attention.linear_proj._extra_state"}[carrier.id]
        rec = item_records(ckpt, fqn)
        rec["data.pkl"] = patch(rec["data.pkl"])
        replace_item(ckpt, fqn, zip_bytes(rec))
    finish(ckpt)


def finish(ckpt: Path) -> None:
    """Drop the side files a base keeps for its carriers."""
    (ckpt / "rank1-nonzip.pt").unlink(missing_ok=True)

