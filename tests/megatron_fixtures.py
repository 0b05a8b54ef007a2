"""Real megatron-core checkpoints + reference logits for the tests, generated on demand.

    from megatron_fixtures import megatron_checkpoint, load_reference
    d = megatron_checkpoint("llama", tp=2, pp=1, fmt="torch")
    d / "ckpt"            # Megatron-LM save dir (latest_checkpointed_iteration.txt, iter_0000010/)
    load_reference(d)     # {'tokens': [2,8], 'position_ids': [2,8], 'logits': [2,8,128]}

Fixtures are made by ``tests/fixture_makers/megatron_core.py`` in a subprocess (``sys.executable``
must have megatron-core, torch and psutil) and cached under
``tests/.fixture-cache/<kind>-tp<tp>-pp<pp>-<fmt>/``.  Generation writes into a temporary
sibling directory that is renamed into place, so concurrent pytest workers are safe: the
loser of the race just discards its copy.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from fixture_makers.megatron_core import KINDS  # the fixture maker's list (its module imports stdlib only)

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "tests" / "fixture_makers" / "megatron_core.py"
CACHE_DIR = Path(os.environ.get("MEXC_FIXTURE_CACHE", REPO_ROOT / "tests" / ".fixture-cache"))

FORMATS = ("torch", "torch_dist")
FIXTURE_REV = "r2"  # bump when the fixture maker changes what it writes (r2: NullTokenizer vocab_size = 99 + eod)
SEED = 1234


class FixtureGenerationError(RuntimeError):
    pass


def have_megatron_core() -> bool:
    """True if ``sys.executable`` can import megatron.core (cheap check, no import here)."""
    import importlib.util

    return importlib.util.find_spec("megatron") is not None and (
        importlib.util.find_spec("megatron.core") is not None
    )


def _complete(d: Path) -> bool:
    return (d / "reference.pt").is_file() and (d / "fixture.json").is_file() and (
        d / "ckpt" / "latest_checkpointed_iteration.txt"
    ).is_file()


def megatron_checkpoint(kind: str, tp: int = 1, pp: int = 1, fmt: str = "torch") -> Path:
    """Return the fixture dir (``ckpt/``, ``reference.pt``, ``fixture.json``), making it if needed."""
    if kind not in KINDS:
        raise ValueError(f"unknown fixture kind {kind!r}; expected one of {KINDS}")
    if fmt not in FORMATS:
        raise ValueError(f"unknown checkpoint format {fmt!r}; expected one of {FORMATS}")
    name = f"{kind}-tp{tp}-pp{pp}-{fmt}-{FIXTURE_REV}"
    final = CACHE_DIR / name
    if _complete(final):
        return final

    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=CACHE_DIR))
    os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
    try:
        cmd = [
            sys.executable,
            str(SCRIPT),
            "--kind", kind,
            "--tp", str(tp),
            "--pp", str(pp),
            "--format", fmt,
            "--out", str(tmp),
            "--seed", str(SEED),
        ]  # fmt: skip
        env = dict(os.environ)
        env.setdefault("PYTHONWARNINGS", "ignore")
        proc = subprocess.run(
            cmd, cwd=str(REPO_ROOT), env=env, capture_output=True, text=True, timeout=600
        )
        if proc.returncode != 0 or not _complete(tmp):
            raise FixtureGenerationError(
                f"generating megatron fixture {name} failed (rc={proc.returncode}).\n"
                f"command: {' '.join(cmd)}\n"
                f"--- stderr (tail) ---\n{proc.stderr[-8000:]}\n"
                f"--- stdout (tail) ---\n{proc.stdout[-2000:]}"
            )
        try:
            os.rename(tmp, final)
        except OSError:
            # Someone else finished first (final exists and is non-empty): use theirs.
            if not _complete(final):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def load_reference(d) -> dict:
    """``reference.pt`` of a fixture dir: tokens [2,8], position_ids [2,8], logits [2,8,128]."""
    import torch

    return torch.load(Path(d) / "reference.pt", map_location="cpu", weights_only=True)


def load_fixture_info(d) -> dict:
    """``fixture.json`` of a fixture dir (kind, tp, pp, format, versions, hparams)."""
    return json.loads((Path(d) / "fixture.json").read_text())
