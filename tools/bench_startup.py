"""Start-up time of the `mexc` command (issue 21 item 2): help, usage errors and a full compile of the example.

    python -m mexc.tools.bench_startup [--runs 5] [--json]

Each case runs ``--runs`` times in a fresh interpreter (what a user's shell does), in the order given, and
reports the median and the fastest wall time in seconds, the exit code, and which heavy modules (torch, numpy,
transformers, onnx, safetensors) were imported by the time the command returned. The help and usage-error
cases must stay under :data:`BOUND` (0.5 s) and import none of them: mexc judges the command line before it
loads torch (tools/compile_flags.py ``precheck_compile``, tools/cli.py ``_precheck_inspect``). The baselines
(``python -c pass``, ``import torch``) show what the machine itself costs; the full compile is there for the
record (it imports torch to read the checkpoint). Times depend on the machine's load: compare the rows of one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BOUND = 0.5
HEAVY = ("torch", "numpy", "transformers", "onnx", "safetensors")
ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "llama-tiny"

# runs `mexc ARGS` as the console script does, then reports the heavy modules on stderr's last line
_PROBE = ("import sys\nfrom mexc.tools.cli import main\ntry:\n    rc = main(sys.argv[1:])\n"
          "except SystemExit as e:\n    rc = e.code\n"
          f"sys.stderr.write('\\n@@' + ','.join(m for m in {HEAVY!r} if m in sys.modules) + '\\n')\n"
          "sys.exit(rc)\n")


def cases(tmp: Path) -> list[tuple[str, list[str] | None, bool]]:
    """(label, argv of `mexc` or None for a plain-Python baseline, whether it must start under BOUND)."""
    (tmp / "exists").mkdir(exist_ok=True)
    ex = str(EXAMPLE)
    return [
        ("python -c pass (baseline)", None, False),
        ("python -c 'import torch' (baseline)", None, False),
        ("mexc --help", ["--help"], True),
        ("mexc --version", ["--version"], True),
        ("mexc compile --help", ["compile", "--help"], True),
        ("usage: mexc compile (no arguments)", ["compile"], True),
        ("usage: --target hf --tp 2", ["compile", ex, "--target", "hf", "--tp", "2", "-o", str(tmp / "o")], True),
        ("usage: -o exists", ["compile", ex, "--target", "hf", "-o", str(tmp / "exists")], True),
        ("usage: inspect --ir --json", ["inspect", ex, "--ir", "--json"], True),
        ("mexc inspect examples/llama-tiny", ["inspect", ex], False),
        ("mexc compile examples/llama-tiny --target hf", ["compile", ex, "--target", "hf", "-o", str(tmp / "hf"),
                                                          "--quiet", "--force"], False),
    ]


def run_once(label: str, argv: list[str] | None) -> tuple[float, int, list[str]]:
    if argv is None:
        cmd = [sys.executable, "-c", "import torch" if "torch" in label else "pass"]
    else:
        cmd = [sys.executable, "-c", _PROBE, *argv]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    tail = r.stderr.rstrip().rpartition("\n")[2] if argv is not None else "@@"
    heavy = [m for m in tail[2:].split(",") if m] if tail.startswith("@@") else ["?"]
    return wall, r.returncode, heavy


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5, help="runs per case (median and fastest are reported)")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    a = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="mexc-bench-startup-") as tmp:
        for label, args, bounded in cases(Path(tmp)):
            runs = [run_once(label, args) for _ in range(a.runs)]
            walls = [w for w, _, _ in runs]
            rc, heavy = runs[-1][1], runs[-1][2]
            med = statistics.median(walls)
            ok = (med < BOUND and not heavy) if bounded else None
            rows.append({"case": label, "median_s": round(med, 3), "min_s": round(min(walls), 3), "rc": rc,
                         "heavy_imports": heavy, "bound_s": BOUND if bounded else None, "ok": ok})
    if a.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"{'case':48s} {'median s':>9s} {'min s':>7s} {'rc':>3s}  heavy imports   (< {BOUND} s, none)")
        for r in rows:
            verdict = "" if r["ok"] is None else ("  ok" if r["ok"] else "  OVER")
            print(f"{r['case']:48s} {r['median_s']:9.3f} {r['min_s']:7.3f} {r['rc']:3d}  "
                  f"{','.join(r['heavy_imports']) or '-':15s}{verdict}")
    return 0 if all(r["ok"] is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
