"""Finding a Megatron checkpoint and what it holds: the save directory, the iteration, the format (legacy
``torch`` per-rank files or ``torch_dist``), the saved args and the rank files, all validated (no tensor read).

The stores that read tensor bytes on demand are :mod:`.legacy_store` and :mod:`.dcp_store`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import CheckpointError
from ...ir import Store
from .safe_load import torch_load

_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$")
_ITER = re.compile(r"^iter_(\d{7,12})$")  # Megatron pads to 7 digits; longer runs write 8 or more
_MAX_PARALLEL = 1 << 16                    # tp, pp, ep, etp: larger values are not a real run's


@dataclass
class CheckpointInfo:
    """Where a checkpoint is and what it holds (no tensor data read)."""

    root: Path                      # the directory the user gave
    iter_dir: Path                  # iter_NNNNNNN or release
    format: str                     # torch | torch_dist
    iteration: int | None
    args: Any                       # argparse.Namespace (or a dict-like)
    checkpoint_version: float | None
    rank_files: dict[tuple[int, int, int], Path] = field(default_factory=dict)  # (tp, pp, ep) -> file (torch)
    expert_tp: int | None = None    # expert_tensor_parallel_size (legacy files; None: the same as tp)
    args_missing: bool = False      # no saved args (release/ or converted): the architecture must be given
    store: Store | None = None      # the torch_dist store to read (set by a wrapper: key prefix, tar member files)


def locate(path: str | Path, iteration: int | None = None) -> tuple[Path, Path, int | None]:
    """Resolve a user path to (root, iteration dir, iteration); the iteration dir lies inside the root (a symlink
    that leaves it is refused, like any file of the checkpoint)."""
    root, d, it = _locate(path, iteration)
    if d != root:
        real_root, real = os.path.realpath(root), os.path.realpath(d)
        if os.path.commonpath([real_root, real]) != real_root:
            raise CheckpointError(f"{d}: points outside the checkpoint ({real})",
                                  hint="a checkpoint's files must lie inside its directory; copy the iteration in")
    return root, d, it


def _locate(path: str | Path, iteration: int | None = None) -> tuple[Path, Path, int | None]:
    root = Path(path)
    if not root.exists():
        raise CheckpointError(f"{root}: no such file or directory", hint="give the Megatron save directory (--save), "
                              "a NeMo checkpoint directory or a .nemo archive")
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a directory", hint="give the Megatron save directory, not a file")
    if _is_iter_dir(root):
        m = re.match(r"iter_(\d+)$", root.name)
        return root, root, int(m.group(1)) if m else None
    iters = sorted(p for p in root.iterdir() if p.is_dir() and (_ITER.match(p.name) or p.name == "release"))
    by_number = {int(m.group(1)): p for p in iters if (m := _ITER.match(p.name))}
    tracker = root / "latest_checkpointed_iteration.txt"
    if iteration is not None:
        d = root / "release" if iteration == 0 and (root / "release").is_dir() else by_number.get(iteration)
        if d is None:
            have = ", ".join(p.name for p in iters) or "none"
            raise CheckpointError(f"{root}: no iteration {iteration} (found: {have})",
                                  hint="pick one of the iterations found with --iteration")
        return root, d, iteration
    if tracker.is_file():
        text = tracker.read_text().strip()
        if text == "release":
            d, it = root / "release", 0
        elif text.isdigit() and len(text) < 20:
            it = int(text)
            d = by_number.get(it, root / f"iter_{it:07d}")
        else:
            raise CheckpointError(f"{tracker}: expected an iteration number or 'release', found {text[:40]!r}",
                                  hint="fix the file, or pass --iteration N")
        if not d.is_dir():
            raise CheckpointError(f"{tracker} names iteration {text} but {d} does not exist",
                                  hint="pass --iteration N for one of the saved iterations")
        return root, d, it
    if len(iters) == 1:
        m = _ITER.match(iters[0].name)
        return root, iters[0], int(m.group(1)) if m else 0
    if not iters:
        raise CheckpointError(f"{root}: no Megatron checkpoint here (no latest_checkpointed_iteration.txt, "
                              "no iter_* or release directory, no mp_rank_* or metadata.json)",
                              hint="give the directory Megatron saved to with --save")
    raise CheckpointError(f"{root}: {len(iters)} iterations ({', '.join(p.name for p in iters)}) and no "
                          "latest_checkpointed_iteration.txt", hint="choose one with --iteration N")


def _is_iter_dir(d: Path) -> bool:
    return (d / "metadata.json").is_file() or (d / ".metadata").is_file() or any(
        p.name.startswith("mp_rank_") for p in d.iterdir())


def open_checkpoint(path: str | Path, iteration: int | None = None) -> CheckpointInfo:
    """The checkpoint at ``path``: a Megatron-LM save, or one a NeMo / Megatron-Bridge layout wraps
    (:mod:`.wrappers`: the architecture then comes from the wrapper's saved config)."""
    from .wrappers import open_wrapped

    wrapped = open_wrapped(Path(path), iteration)
    if wrapped is not None:
        return wrapped
    root, d, it = locate(path, iteration)
    if (d / "metadata.json").is_file() or (d / ".metadata").is_file():
        return _open_dist(root, d, it)
    if any(p.name.startswith("mp_rank_") for p in d.iterdir()):
        return _open_legacy(root, d, it)
    raise CheckpointError(f"{d}: neither a legacy (mp_rank_*) nor a torch_dist (metadata.json) checkpoint",
                          hint="the directory is empty or incomplete; copy the checkpoint again")


def _open_legacy(root: Path, d: Path, it: int | None) -> CheckpointInfo:
    dirs = {}
    for p in sorted(d.iterdir()):
        m = _RANK_DIR.match(p.name)
        if m and p.is_dir():
            dirs[p.name] = (m, p)
    if not dirs:
        raise CheckpointError(f"{d}: no mp_rank_* directories", hint="copy the checkpoint again")
    first_name = sorted(dirs)[0]
    first = inside(d, dirs[first_name][1] / "model_optim_rng.pt")
    sd = torch_load(first, mmap=_is_zip(first))
    if not isinstance(sd, dict):
        raise CheckpointError(f"{first}: holds a {type(sd).__name__}, not a Megatron state dict",
                              hint="give the directory Megatron saved to")
    model = [k for k in sd if k == "model" or re.fullmatch(r"model\d+", str(k))]
    if not model or not all(isinstance(sd[k], dict) for k in model):
        raise CheckpointError(f"{first}: holds no 'model' state dict", hint="give the directory Megatron saved "
                              "to; this file is damaged or not a Megatron model checkpoint")
    args = _checked_args(sd.get("args"), first)
    tp = _size(args, first, "tensor_model_parallel_size", "model_parallel_size")
    pp = _size(args, first, "pipeline_model_parallel_size")
    ep = _size(args, first, "expert_model_parallel_size")
    etp = _size(args, first, "expert_tensor_parallel_size", default=tp)
    args_missing = args is None
    if args_missing:  # a release/ or converted checkpoint: the layout comes from the directory names
        import argparse

        tp = etp = 1 + max(int(m.group(1)) for m, _ in dirs.values())
        pp = 1 + max(int(m.group(2) or 0) for m, _ in dirs.values())
        ep = 1 + max(int(m.group(3) or 0) for m, _ in dirs.values())
        args = argparse.Namespace(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                  expert_model_parallel_size=ep)
    files: dict[tuple[int, int, int], Path] = {}
    for name, (m, p) in dirs.items():
        t, a, b = int(m.group(1)), m.group(2), m.group(3)
        if b is not None:
            pr, er = int(a), int(b)
        elif a is not None:
            pr, er = (int(a), 0) if pp > 1 else (0, int(a))  # a 3-digit suffix is EP when pp == 1
        else:
            pr, er = 0, 0
        if (t, pr, er) in files:
            raise CheckpointError(f"{d}: {files[(t, pr, er)].parent.name} and {name} are both tp={t} pp={pr} ep={er}",
                                  hint="remove the stray directory (the iteration holds two layouts)")
        if t >= tp or pr >= pp or er >= ep:
            raise CheckpointError(f"{p}: rank outside tp={tp} pp={pp} ep={ep} from the args",
                                  hint="the args disagree with the files; pass the layout with --config")
        files[(t, pr, er)] = p / "model_optim_rng.pt"
    missing = _missing_ranks(files, tp, pp, ep, etp)
    if missing:
        names = ", ".join(_rank_dir_name(t, p_, e, pp, ep) for t, p_, e in missing[:6])
        raise CheckpointError(f"{d}: missing rank directories {names}{' ...' if len(missing) > 6 else ''} "
                              f"(args say tp={tp} pp={pp} ep={ep} expert tp={etp})",
                              hint="copy the whole iteration directory; every rank's file is needed")
    for key, f in files.items():
        files[key] = inside(d, f)
    info = CheckpointInfo(root, d, "torch", sd.get("iteration", it), args, sd.get("checkpoint_version"), files)
    info.expert_tp = etp
    info.args_missing = args_missing
    return info


def _checked_args(args, where: Path):
    """Saved args are an ``argparse.Namespace`` (or a namespace / dict stand-in); anything else is damage."""
    import argparse
    import types

    if args is None or isinstance(args, (argparse.Namespace, types.SimpleNamespace, dict)):
        return args
    raise CheckpointError(f"{where}: 'args' is a {type(args).__name__}, not Megatron-LM's argparse.Namespace",
                          hint="the file is damaged; pass the architecture with --config FILE.yaml")


def _size(args, where: Path, *names: str, default: int = 1) -> int:
    """A parallel size from the args (1 when absent), bounded so that no later loop is unbounded."""
    v = None
    for n in names:
        v = _arg(args, n) if args is not None else None
        if v is not None:
            break
    v = default if v is None else v
    if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= _MAX_PARALLEL:
        raise CheckpointError(f"{where}: args.{names[0]} = {str(v)[:40]} is not a parallel size (1..{_MAX_PARALLEL})",
                              hint="the args are damaged; pass the layout with --config")
    return v


def _missing_ranks(files, tp: int, pp: int, ep: int, etp: int) -> list[tuple[int, int, int]]:
    """Rank files the layout needs and the directory lacks. Every (tp, pp) pair holds the dense weights and every
    (ep, pp) pair the experts; when the expert TP size equals TP every (tp, ep) pair is its own file, otherwise
    Megatron writes one file per rank of the world (e.g. TP2 EP2 ETP1: mp_rank_00_000 and mp_rank_01_001 only)."""
    if len(files) > _MAX_PARALLEL:
        return []
    need: set[tuple[int, int, int]] = set()
    if etp == tp or ep == 1:
        if tp * pp * ep > 4 * len(files) + 64:  # far more than present: report without listing them all
            return [(t, p, e) for t in range(min(tp, 2)) for p in range(min(pp, 2)) for e in range(min(ep, 2))
                    if (t, p, e) not in files]
        need = {(t, p, e) for t in range(tp) for p in range(pp) for e in range(ep)}
        return sorted(need - set(files))
    have_tp = {(t, p) for t, p, _ in files}
    have_ep = {(e, p) for _, p, e in files}
    out = [(t, p, 0) for p in range(min(pp, len(files) + 1)) for t in range(min(tp, len(files) + 1)) if (t, p) not in have_tp]
    out += [(0, p, e) for p in range(min(pp, len(files) + 1)) for e in range(min(ep, len(files) + 1)) if (e, p) not in have_ep]
    return out


def inside(root: Path, path: Path) -> Path:
    """``path`` if it resolves (symlinks followed) inside ``root`` and is a regular file; else a clear error."""
    import stat

    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    if os.path.commonpath([real_root, real]) != real_root:
        raise CheckpointError(f"{path}: points outside the checkpoint ({real})",
                              hint="a checkpoint's files must lie inside its directory; copy the real file in")
    try:
        st = os.stat(real)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing", hint="copy the whole checkpoint directory") from None
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{path}: not a regular file", hint="a checkpoint holds only plain files")
    return path


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def _rank_dir_name(t, p, e, pp, ep):
    s = f"mp_rank_{t:02d}"
    if pp > 1:
        s += f"_{p:03d}"
    if ep > 1:
        s += f"_{e:03d}"
    return s


def _open_dist(root: Path, d: Path, it: int | None) -> CheckpointInfo:
    import json

    mj = d / "metadata.json"
    if mj.is_file():
        try:
            meta = json.loads(mj.read_text()) if os.path.getsize(inside(d, mj)) < (1 << 20) else None
        except (ValueError, RecursionError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{mj}: not valid JSON ({str(e)[:80]})", hint="copy the checkpoint again") from None
        if not isinstance(meta, dict):
            raise CheckpointError(f"{mj}: not a JSON object of a few fields", hint="copy the checkpoint again")
        backend = meta.get("sharded_backend")
        if backend != "torch_dist":
            raise CheckpointError(f"{mj}: sharded_backend {backend!r} is not supported",
                                  hint="convert it to torch_dist with Megatron-LM's checkpoint tools")
    common = d / "common.pt"
    from .dcp_store import DcpStore  # the store reads the index; layout only asks it for the common state

    store = DcpStore("ckpt", str(d))
    if common.is_file():
        state = torch_load(common, mmap=False)
    else:
        state = store.common_state()
    if not isinstance(state, dict):
        raise CheckpointError(f"{d}: the common state holds a {type(state).__name__}, not a dict",
                              hint="the checkpoint is damaged; copy it again")
    args = _checked_args(state.get("args"), common if common.is_file() else d / "common_state")
    info = CheckpointInfo(root, d, "torch_dist", state.get("iteration", it), args, state.get("checkpoint_version"))
    if args is None:
        import argparse

        info.args, info.args_missing = argparse.Namespace(), True
    return info


def _arg(args, name, default=None):
    if isinstance(args, dict):
        return args.get(name, default)
    return getattr(args, name, default)
