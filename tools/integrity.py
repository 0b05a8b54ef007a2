"""Whole-artifact checks of a mexc output, run by `mexc verify` before it compares any logits.

A logit check reads a few token ids through one rank: it cannot see a corrupted embedding row of a token it
never feeds, nor a replicated tensor of a TensorRT-LLM rank > 0. So every weight byte is checked here:

* each tensor the manifest lists (``mexc-manifest.json`` ``files``: file -> tensor -> checksum, written by
  ``backends/base.py``; algorithm ``xxh3-128`` of the tensor's bytes as stored) is found in its file and its
  checksum recomputed: safetensors files (trtllm ``rank{N}.safetensors``, hf ``model*.safetensors``) through
  their header, ONNX external data (``model.onnx.data``) through the ``location/offset/length`` entries of the
  initializers in ``model.onnx``;
* a file or tensor missing, added, truncated, or with other bytes is a :class:`Problem` naming file and tensor;
* every floating-point tensor is scanned for NaN/Inf (by bit pattern, so bf16 and fp8 need no conversion);
* a trtllm output's ``config.json`` mapping must match the rank files, and tensors that TensorRT-LLM holds
  replicated on every TP rank must be byte-identical across the ranks (:func:`replicated_mismatches`).

Memory is bounded: each tensor is read in ``CHUNK``-byte blocks into one reused buffer, whatever its size.
Nothing here raises on bad content: every finding is returned as a Problem.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

CHUNK = 8 << 20          # bytes read at a time (a multiple of every item size)
MAX_HEADER = 100 << 20   # the safetensors library's own limit on a header
WEIGHT_SUFFIXES = (".safetensors", ".data", ".bin", ".pt", ".pth", ".gguf", ".npz")  # files a runtime may load

# safetensors dtype code -> item size in bytes (0.5: packed 4-bit)
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2,
            "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "I4": 0.5, "U4": 0.5}
# NaN/Inf by bit pattern: (unsigned view, mask, value): non-finite where bits & mask == value. IEEE formats:
# exponent all ones; float8 e4m3fn (OCP FP8 spec) has no Inf and one NaN pattern per sign, S.1111.111.
NONFINITE = {"F64": (np.uint64, 0x7FF0000000000000, 0x7FF0000000000000), "F32": (np.uint32, 0x7F800000, 0x7F800000),
             "F16": (np.uint16, 0x7C00, 0x7C00), "BF16": (np.uint16, 0x7F80, 0x7F80),
             "F8_E5M2": (np.uint8, 0x7C, 0x7C), "F8_E4M3": (np.uint8, 0x7F, 0x7F)}


@dataclass
class Problem:
    """One finding: the file (relative to the output), the tensor where there is one, and what is wrong."""

    file: str
    tensor: str | None
    what: str

    def __str__(self) -> str:
        return f"FAIL {self.file}: " + (f"tensor {self.tensor}: " if self.tensor else "") + self.what


@dataclass(frozen=True)
class Span:
    """Where one tensor's bytes lie: absolute ``offset`` and ``length`` in its file; ``dtype`` a safetensors code
    (None for a type without a NaN check)."""

    name: str
    dtype: str | None
    offset: int
    length: int


@dataclass
class Report:
    """What :func:`check_artifact` found. ``sums``: file -> tensor -> recomputed checksum (readable tensors)."""

    files: int = 0
    tensors: int = 0
    bytes: int = 0
    problems: list[Problem] = field(default_factory=list)
    sums: dict[str, dict[str, str]] = field(default_factory=dict)
    spans: dict[str, dict[str, Span]] = field(default_factory=dict)  # file -> tensor -> where its bytes are

    @property
    def ok(self) -> bool:
        return not self.problems

    def fail(self, file: str, tensor: str | None, what: str) -> None:
        self.problems.append(Problem(file, tensor, what))


# ------------------------------------------------------------------------------------ locating tensors


def _inside(out: Path, name: object) -> Path | None:
    """``out / name`` when ``name`` is a plain relative path that stays inside ``out``; else None."""
    if not isinstance(name, str) or not name or os.path.isabs(name) or ".." in Path(name).parts:
        return None
    p = out / name
    return p if p.resolve().is_relative_to(out.resolve()) else None


def _regular(path: Path) -> str | None:
    """Why ``path`` cannot be read as a weight file (missing, a FIFO, a directory ...), or None."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "missing"
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    return None


def safetensors_spans(path: Path) -> tuple[list[Span], str | None]:
    """The tensors of a safetensors file (format: 8-byte little-endian header length, JSON header of
    ``{name: {dtype, shape, data_offsets: [begin, end]}}`` with offsets relative to the end of the header).
    Returns (spans, why the header is unusable or None); a span that ends past the end of the file is kept
    (reading it reports the truncation)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            if size < 8:
                return [], f"{size} bytes: too short for a safetensors header"
            (n,) = struct.unpack("<Q", f.read(8))
            if n > min(size - 8, MAX_HEADER):
                return [], f"header length {n} exceeds the file ({size} bytes): truncated or not safetensors"
            header = json.loads(f.read(n))
    except (ValueError, UnicodeDecodeError) as e:
        return [], f"header is not valid JSON ({e})"
    except OSError as e:
        return [], f"cannot be read ({e.strerror})"
    if not isinstance(header, dict):
        return [], "header is not a JSON object"
    spans, base = [], 8 + n
    for name, h in header.items():
        if name == "__metadata__":
            continue
        ok = isinstance(h, dict) and h.get("dtype") in ITEMSIZE and isinstance(h.get("shape"), list) and \
            all(isinstance(d, int) and d >= 0 for d in h["shape"]) and isinstance(h.get("data_offsets"), list) and \
            len(h["data_offsets"]) == 2 and all(isinstance(o, int) for o in h["data_offsets"])
        if not ok:
            return [], f"header entry of tensor {name!r} is malformed"
        begin, end = h["data_offsets"]
        want = math.ceil(math.prod(h["shape"]) * ITEMSIZE[h["dtype"]])
        if not 0 <= begin <= end or end - begin != want:
            return [], (f"header entry of tensor {name!r}: data_offsets {begin}..{end} do not hold "
                        f"{h['dtype']}{h['shape']}")
        spans.append(Span(name, h["dtype"], base + begin, end - begin))
    return spans, None


def _onnx_dtypes() -> dict[int, tuple[str | None, float]]:
    """ONNX TensorProto data type -> (safetensors code for the NaN check or None, item size in bytes)."""
    from onnx import TensorProto as T

    table = {"FLOAT": ("F32", 4), "FLOAT16": ("F16", 2), "BFLOAT16": ("BF16", 2), "DOUBLE": ("F64", 8),
             "FLOAT8E4M3FN": ("F8_E4M3", 1), "FLOAT8E5M2": ("F8_E5M2", 1), "FLOAT8E4M3FNUZ": (None, 1),
             "FLOAT8E5M2FNUZ": (None, 1), "INT8": (None, 1), "UINT8": (None, 1), "INT16": (None, 2),
             "UINT16": (None, 2), "INT32": (None, 4), "UINT32": (None, 4), "INT64": (None, 8), "UINT64": (None, 8),
             "BOOL": (None, 1), "INT4": (None, 0.5), "UINT4": (None, 0.5)}
    return {getattr(T, k): v for k, v in table.items() if hasattr(T, k)}


def onnx_spans(out: Path, model_file: Path, report: Report) -> dict[str, list[Span]]:
    """External initializers of ``model_file`` grouped by data file (relative name). Problems (an unreadable
    proto, a location outside the output, a length that does not fit the type) go to ``report``."""
    import onnx

    rel = model_file.name
    try:
        proto = onnx.load(str(model_file), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf raises its own DecodeError and friends
        report.fail(rel, None, f"not a readable ONNX model ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
        return {}
    types = _onnx_dtypes()
    spans: dict[str, list[Span]] = {}
    for t in proto.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        name = t.name if isinstance(t.name, str) else repr(t.name)  # protobuf hands back bytes for bad UTF-8
        ext = {str(e.key): e.value for e in t.external_data}
        loc = ext.get("location")
        if not isinstance(loc, str) or _inside(out, loc) is None:
            report.fail(rel, name, f"external data location {loc!r} is not a file inside the output")
            continue
        try:
            off, n = int(ext.get("offset", 0)), int(ext["length"])
        except (KeyError, ValueError):
            report.fail(rel, name, f"external data offset/length missing or not integers: {ext}")
            continue
        code, item = types.get(t.data_type, (None, None))
        want = math.ceil(math.prod(t.dims) * item) if item else n
        if off < 0 or n != want:
            report.fail(rel, name, f"external data offset {off} / length {n} do not hold type {t.data_type} "
                                     f"dims {list(t.dims)}")
            continue
        spans.setdefault(loc, []).append(Span(name, code, off, n))
    return spans


# ------------------------------------------------------------------------------------ reading tensors


def _nonfinite(dtype: str | None, buf: memoryview) -> tuple[int, int]:
    """(count of NaN/Inf values in ``buf``, index of the first or -1)."""
    if dtype not in NONFINITE:
        return 0, -1
    view, mask, value = NONFINITE[dtype]
    bad = np.flatnonzero((np.frombuffer(buf, dtype=view) & view(mask)) == view(value))
    return int(bad.size), int(bad[0]) if bad.size else -1


def scan(f, span: Span, buf: bytearray, new_hash) -> tuple[str | None, int, int, int]:
    """Read ``span`` from the open raw file ``f`` in blocks of ``len(buf)`` bytes: (checksum, or None where the
    file ends first; bytes read; NaN/Inf count; flat index of the first NaN/Inf or -1)."""
    h = new_hash()
    item = int(ITEMSIZE.get(span.dtype or "", 1)) or 1
    left, done, bad, first = span.length, 0, 0, -1
    f.seek(span.offset)
    mv = memoryview(buf)
    while left:
        want, got = min(left, len(buf)), 0
        while got < want:
            r = f.readinto(mv[got:want])
            if not r:
                return None, done + got, bad, first
            got += r
        block = mv[:got]
        h.update(block)
        k, i = _nonfinite(span.dtype, block)
        if k:
            bad += k
            first = done // item + i if first < 0 else first
        done += got
        left -= got
    return h.hexdigest(), done, bad, first


def check_file(path: Path, rel: str, spans: list[Span], expected: dict[str, str], report: Report,
               buf: bytearray) -> None:
    """Compare the tensors of one file against the manifest's ``expected`` (tensor -> checksum)."""
    from ..backends.base import new_checksum

    found = {s.name: s for s in spans}
    for name in sorted(set(expected) - set(found)):
        report.fail(rel, name, "missing from the file (the manifest lists it)")
    for name in sorted(set(found) - set(expected)):
        report.fail(rel, name, "not in the manifest (added after compile)")
    size = path.stat().st_size
    sums = report.sums.setdefault(rel, {})
    report.spans[rel] = dict(found)
    cut = [s for s in spans if s.offset + s.length > size]
    if cut:  # one line for a truncated file, naming the first tensor it cuts
        c = min(cut, key=lambda s: s.offset)
        more = f"; {len(cut) - 1} more tensor(s) after it are cut too" if len(cut) > 1 else ""
        report.fail(rel, c.name, f"the file ends at byte {size}, inside or before this tensor's bytes "
                                 f"{c.offset}..{c.offset + c.length}: truncated{more}")
    with open(path, "rb", buffering=0) as f:
        for s in sorted(spans, key=lambda s: s.offset):
            report.tensors += 1
            if s.offset + s.length > size:
                continue
            digest, n, bad, first = scan(f, s, buf, new_checksum)
            report.bytes += n
            if digest is None:
                report.fail(rel, s.name, f"the file ends after {n} of its {s.length} bytes: truncated")
                continue
            sums[s.name] = digest
            what = []  # one line per tensor, whatever is wrong with it
            if s.name in expected and digest != expected[s.name]:
                what.append("checksum differs from the manifest (its bytes changed after compile)")
            if bad:
                what.append(f"{bad} NaN/Inf value(s), the first at flat index {first}")
            if what:
                report.fail(rel, s.name, "; ".join(what))


# ------------------------------------------------------------------------------------ the whole artifact


def check_artifact(out: Path, manifest: dict) -> Report:
    """Every weight file the manifest lists (and no other), every tensor in it, checksums and NaN/Inf."""
    out = Path(out)
    report = Report()
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(isinstance(v, dict) for v in files.values()):
        report.fail("mexc-manifest.json", None, "has no per-file tensor checksums ('files'); recompile the output")
        return report
    onnx_models = sorted(p for p in out.glob("*.onnx") if p.is_file())
    onnx: dict[str, list[Span]] = {}
    for m in onnx_models:
        for loc, spans in onnx_spans(out, m, report).items():
            onnx.setdefault(loc, []).extend(spans)
    if manifest.get("target") in ("onnx", "tensorrt") and not onnx_models:
        report.fail("model.onnx", None, "missing (an onnx output's graph; it locates the weights)")
    buf = bytearray(CHUNK)
    for rel, expected in sorted(files.items()):
        path = _inside(out, rel)
        if path is None:
            report.fail("mexc-manifest.json", None, f"lists {rel!r}, which is not a file inside the output")
            continue
        why = _regular(path)
        if why:
            report.fail(rel, None, f"{why} (the manifest lists {len(expected)} tensors in it)")
            continue
        report.files += 1
        if rel.endswith(".safetensors"):
            spans, why = safetensors_spans(path)
            if why:
                report.fail(rel, None, why)
                continue
        elif rel in onnx:
            spans = onnx.pop(rel)
        else:
            if onnx_models:
                report.fail(rel, None, f"no initializer of {', '.join(m.name for m in onnx_models)} points into it")
            else:
                report.fail(rel, None, "cannot locate its tensors (not safetensors, and no model.onnx)")
            continue
        check_file(path, rel, spans, {k: str(v) for k, v in expected.items()}, report, buf)
    for loc, spans in sorted(onnx.items()):
        report.fail(loc, None, f"holds {len(spans)} initializer(s) of the ONNX model but is not in the manifest")
    for p in sorted(out.iterdir()):
        if p.name not in files and p.name not in onnx and p.name.endswith(WEIGHT_SUFFIXES) and p.is_file():
            report.fail(p.name, None, "weight file not in the manifest (added after compile)")
    if manifest.get("target") == "trtllm":
        _check_trtllm_layout(out, files, report)
    if os.path.lexists(out / "model.safetensors.index.json"):
        _check_hf_index(out, files, report)
    return report


def _check_trtllm_layout(out: Path, files: dict, report: Report) -> None:
    """config.json's mapping asks for rank0..rank{tp*pp-1}.safetensors: exactly the manifest's files."""
    why = _regular(out / "config.json")
    if why:
        report.fail("config.json", None, why)
        return
    try:
        m = json.loads((out / "config.json").read_text()).get("mapping", {})
        tp, pp = int(m.get("tp_size", 1)), int(m.get("pp_size", 1))
    except (OSError, ValueError, AttributeError, TypeError) as e:
        report.fail("config.json", None, f"unreadable or without a valid mapping ({e})")
        return
    want = {f"rank{r}.safetensors" for r in range(tp * pp)}
    have = {f for f in files if f.endswith(".safetensors") and _inside(out, f) is not None}  # others reported
    for f in sorted(want - have):
        report.fail(f, None, f"config.json's mapping (tp={tp}, pp={pp}) needs it; the manifest has no such file")
    for f in sorted(have - want):
        report.fail(f, None, f"the manifest lists it but config.json's mapping has tp={tp}, pp={pp}")


def _check_hf_index(out: Path, files: dict, report: Report) -> None:
    """A sharded HF output: the index must send every tensor to the file that holds it."""
    rel = "model.safetensors.index.json"
    why = _regular(out / rel)
    if why:
        report.fail(rel, None, why)
        return
    try:
        wm = json.loads((out / rel).read_text())["weight_map"]
        assert isinstance(wm, dict)
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        report.fail(rel, None, "unreadable or without a weight_map")
        return
    where = {t: f for f, ts in files.items() for t in ts}
    for t in sorted(set(where) | set(wm)):
        if wm.get(t) != where.get(t):
            report.fail(rel, t, f"maps it to {wm.get(t)!r}; the manifest has it in {where.get(t)!r}")


def replicated_mismatches(model, report: Report, tp: int) -> list[Problem]:
    """Tensors of a trtllm output that the lifted ``model`` reads from one rank of a pipeline stage only (those
    TensorRT-LLM keeps replicated on every TP rank: norms, row-parallel biases, a non-parallel embedding):
    every other rank of the stage must hold the same bytes (compared by the checksums ``report`` recomputed).
    TensorRT-LLM's rank r loads its own copy, so a copy that differs serves wrong results on that rank only."""
    if tp < 2:
        return []
    read: dict[tuple[int, str], set[int]] = {}
    for _, _, p in model.graph.params():
        for leaf in p.source.leaves():
            m = re.fullmatch(r"rank(\d+)\.safetensors:(.+)", str(leaf.attrs.get("key", "")), re.S)
            if m is None:
                continue
            r, tname = int(m.group(1)), m.group(2)
            read.setdefault((r // tp, tname), set()).add(r)
    problems = []
    for (stage, tname), ranks in sorted(read.items()):
        if len(ranks) != 1:
            continue
        (r0,) = ranks
        ref = report.sums.get(f"rank{r0}.safetensors", {}).get(tname)
        for r in range(stage * tp, stage * tp + tp):
            got = report.sums.get(f"rank{r}.safetensors", {}).get(tname)
            if r != r0 and ref is not None and got is not None and got != ref:
                problems.append(Problem(f"rank{r}.safetensors", tname,
                                        f"differs from rank{r0}'s copy (TensorRT-LLM keeps it replicated: every TP "
                                        "rank must hold the same bytes)"))
    return problems


def duplicated_kv_mismatches(out: Path, report: Report, cfg: dict) -> list[Problem]:
    """With more TP ranks than KV heads, each rank of a trtllm output holds a copy of one KV head: rank r the
    head ``(r % tp) // (tp // nkv)``, as the K and V rows of its ``[Q_r; K_r; V_r]`` ``attention.qkv`` weight and
    bias (TensorRT-LLM's checkpoint convention; tests/trtllm_reader.py checks it the same way). Copies of one
    head must be identical on the ranks that share it; mexc's reader runs the first copy only, so a differing
    copy is found here, by hashing those rows of each rank (``report.spans`` from :func:`check_artifact`)."""
    m = cfg.get("mapping") or {}
    tp, nh = int(m.get("tp_size", 1)), int(cfg["num_attention_heads"])
    nkv = int(cfg.get("num_key_value_heads") or nh)
    if tp <= nkv or tp % nkv:
        return []
    from ..backends.base import new_checksum

    d = int(cfg.get("head_size") or cfg["hidden_size"] // nh)
    step, q_rows, rows = tp // nkv, nh // tp * d, nh // tp * d + 2 * d
    buf = bytearray(CHUNK)

    def kv_hash(rel: str, s: Span) -> str | None:
        row = s.length // rows
        with open(out / rel, "rb", buffering=0) as f:
            return scan(f, Span(s.name, None, s.offset + q_rows * row, 2 * d * row), buf, new_checksum)[0]

    problems = []
    for rel, spans in sorted(report.spans.items()):
        k = re.fullmatch(r"rank(\d+)\.safetensors", rel)
        if k is None or int(k.group(1)) % tp % step == 0:
            continue
        r = int(k.group(1))
        ref_rel = f"rank{r - r % tp % step}.safetensors"
        for name, s in sorted(spans.items()):
            ref = report.spans.get(ref_rel, {}).get(name)
            if not re.fullmatch(r"transformer\.layers\.\d+\.attention\.qkv\.(weight|bias)", name) or ref is None \
                    or ref.length != s.length or s.length % rows:
                continue
            if kv_hash(rel, s) != kv_hash(ref_rel, ref):
                problems.append(Problem(rel, name, f"its copy of KV head {r % tp // step} (rows {q_rows}..{rows}) "
                                                   f"differs from {ref_rel}'s; ranks sharing a KV head must hold "
                                                   "the same K and V rows"))
    return problems
