"""Compile-throughput and memory benchmark on synthetic checkpoints of real model shapes.

For each preset: write a synthetic Megatron checkpoint (legacy ``torch`` TP2 and ``torch_dist``) with
:mod:`mexc.tools.synth_checkpoint`, measure the I/O ceiling (``cp -r`` of the same source on the same disk),
then time ``mexc compile`` to each target in a fresh child process (wall time; peak RSS of that child from
``/usr/bin/time``, plus sampled RssAnon/RssFile). Page caches are dropped before every timed run when we may (root), for cp and mexc alike, and
every timed run ends with ``sync`` so that throughput counts bytes that reached the disk.

    python -m mexc.tools.bench --preset 1b --preset llama2-7b [--formats torch,torch_dist]
        [--targets trtllm,trtllm-tp2,hf,onnx] [--workdir /tmp/mexc-bench] [--json out.json]

A second ceiling is the disk's own: ``dd`` reading every source file with ``O_DIRECT`` while another ``dd``
writes as many bytes with ``O_DIRECT``, both at once (a compile reads and writes every byte), in the same run.

Goals checked per run (trtllm, hf): wall + sync <= 1.0x cp's (``x cp`` >= 1.0: throughput relative to cp) and
<= 1.3x the dd read+write time (``x dd`` <= 1.3); peak RSS <= 2 GB + 2x the largest tensor; time per GB and RSS
flat from the smallest to the largest preset.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

from .synth_checkpoint import PRESETS, dir_bytes

GB = 1e9
# target name -> extra compile arguments
TARGETS = {
    "trtllm": ["--target", "trtllm", "--tp", "1"],
    "trtllm-tp2": ["--target", "trtllm", "--tp", "2"],
    "hf": ["--target", "hf"],
    "onnx": ["--target", "onnx"],
}
THROUGHPUT_GOAL = 1.0        # x cp: at least cp -r's bytes per second (issue 21; 0.8 before)
DISK_GOAL = 1.3              # x dd: at most 1.3x the time of dd's O_DIRECT read + write of the same bytes
DD_BLOCK = 16 << 20
THROUGHPUT_TARGETS = ("trtllm", "trtllm-tp2", "hf")


# ---------------------------------------------------------------------------------------------- helpers


def can_drop_caches() -> bool:
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def drop_caches(enabled: bool) -> None:
    subprocess.run(["sync"], check=True)
    if enabled:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")


TIME = shutil.which("time", path="/usr/bin:/bin")


def run_child(cmd: list[str], *, log_path: Path, env=None, timeout: float | None = None) -> dict:
    """Run ``cmd``; wall seconds, sync seconds, peak RSS (bytes) of that child alone, exit status.

    The peak RSS comes from ``/usr/bin/time`` (a small C program) forking the command: a child forked by this
    Python process directly would inherit its RSS high-water mark (Linux keeps ``maxrss`` across fork and
    exec), so ``os.wait4`` alone would report max(our RSS, child's RSS).
    """
    rss_file = log_path.with_suffix(".rss")
    full = [TIME, "-f", "%M", "-o", str(rss_file), *cmd] if TIME else cmd
    with open(log_path, "wb") as log:
        t0 = time.perf_counter()
        p = subprocess.Popen(full, stdout=log, stderr=subprocess.STDOUT, env=env)
        timed_out = False
        peaks = {"RssAnon": 0, "RssFile": 0}
        deadline = None if timeout is None else t0 + timeout
        while p.poll() is None:
            _sample_rss(p.pid, peaks)
            if deadline and time.perf_counter() > deadline:
                p.kill()
                p.wait()
                timed_out = True
                break
            time.sleep(0.05)
        wall = time.perf_counter() - t0
    t1 = time.perf_counter()
    subprocess.run(["sync"], check=True)
    sync_s = time.perf_counter() - t1
    rss = 0
    if TIME and rss_file.exists():
        lines = [x for x in rss_file.read_text().split() if x.isdigit()]
        rss = int(lines[-1]) * 1024 if lines else 0
    if not rss:  # no /usr/bin/time: an upper bound (includes this process's own high-water mark)
        import resource

        rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return {"wall_s": wall, "sync_s": sync_s, "peak_rss": rss, "rc": p.returncode, "timed_out": timed_out,
            "peak_rss_anon": peaks["RssAnon"], "peak_rss_file": peaks["RssFile"]}


def _sample_rss(pid: int, peaks: dict) -> None:
    """Peak anonymous / file-backed RSS of ``pid``'s process tree (sampled; file pages = mmap'd checkpoint)."""
    pids = [pid]
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                pids += [int(x) for x in f.read().split()]
    except OSError:
        pass
    for q in pids[1:] or pids:  # the command under /usr/bin/time, or the process itself
        try:
            with open(f"/proc/{q}/status") as f:
                for line in f:
                    k, _, v = line.partition(":")
                    if k in peaks:
                        peaks[k] = max(peaks[k], int(v.split()[0]) * 1024)
        except OSError:
            pass


def largest_output_tensor(out: Path) -> int:
    """Largest tensor (bytes) in the safetensors files under ``out``."""
    best = 0
    for f in out.rglob("*.safetensors"):
        with open(f, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            hdr = json.loads(fh.read(n))
        for k, v in hdr.items():
            if k != "__metadata__":
                a, b = v["data_offsets"]
                best = max(best, b - a)
    return best


def machine_info(workdir: Path) -> dict:
    from ..backends.base import direct_io_enabled

    info = {"cores": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release(),
            "direct_io": direct_io_enabled()}
    try:
        with open("/proc/meminfo") as f:
            info["ram_gb"] = round(int(f.readline().split()[1]) * 1024 / GB, 1)
    except OSError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        pass
    try:
        df = subprocess.run(["df", "-h", "--output=source,fstype,size,avail", str(workdir)], capture_output=True,
                            text=True).stdout.strip().splitlines()[-1].split()
        info["disk"] = {"device": df[0], "fstype": df[1], "size": df[2], "avail": df[3]}
        dev = os.path.basename(df[0])
        rot = Path(f"/sys/block/{dev}/queue/rotational")
        if rot.exists():
            info["disk"]["rotational"] = rot.read_text().strip() == "1"
    except (OSError, IndexError):
        pass
    return info


def dd_ceiling(src: Path, scratch: Path, log_path: Path) -> dict:
    """The disk's read+write limit for ``src``'s bytes: one ``dd iflag=direct`` per source file (in sequence) to
    /dev/null while one ``dd oflag=direct`` writes as many bytes (rounded up to 16 MiB blocks) from /dev/zero to
    ``scratch``, both started together; wall seconds until both end, plus ``sync``. ``scratch`` is deleted.

    Raises RuntimeError when dd fails (e.g. a file system without O_DIRECT)."""
    files = sorted(str(f) for f in src.rglob("*") if f.is_file())
    total = sum(os.path.getsize(f) for f in files)
    count = max(1, -(-total // DD_BLOCK))
    with open(log_path, "wb") as log:
        t0 = time.perf_counter()
        reader = subprocess.Popen(["sh", "-c", 'for f in "$@"; do dd if="$f" of=/dev/null bs=16M iflag=direct '
                                   'status=none || exit 1; done', "dd-read", *files], stdout=log, stderr=log)
        writer = subprocess.Popen(["dd", "if=/dev/zero", f"of={scratch}", "bs=16M", f"count={count}",
                                   "oflag=direct", "status=none"], stdout=log, stderr=log)
        rc = (reader.wait(), writer.wait())
        wall = time.perf_counter() - t0
        t1 = time.perf_counter()
        subprocess.run(["sync"], check=True)
        sync = time.perf_counter() - t1
    scratch.unlink(missing_ok=True)
    if rc != (0, 0):
        raise RuntimeError(f"dd failed (rc {rc}): {log_path.read_text(errors='replace')[-500:]}")
    return {"wall_s": round(wall, 2), "sync_s": round(sync, 2), "read_bytes": total,
            "write_bytes": count * DD_BLOCK}


# ---------------------------------------------------------------------------------------------- bench


def bench_preset(name: str, a, drop: bool, log) -> dict:
    p = PRESETS[name]
    base = Path(a.workdir) / name
    base.mkdir(parents=True, exist_ok=True)
    largest = p.largest_tensor_bytes(a.source_tp)
    res = {"preset": name, "params": p.param_count(a.source_tp), "largest_tensor_bytes": largest,
           "rss_goal_bytes": int(2 * GB + 2 * largest), "formats": {}}
    for fmt in a.formats:
        src = base / f"ckpt-{fmt}"
        # in a child process, so that this one stays small
        shutil.rmtree(src, ignore_errors=True)
        s = run_child([sys.executable, "-m", "mexc.tools.synth_checkpoint", "--preset", name, "--format", fmt,
                       "--tp", str(a.source_tp), "--out", str(src)], log_path=base / f"synth-{fmt}.log")
        if s["rc"] != 0:
            raise RuntimeError(f"synth_checkpoint failed: {(base / f'synth-{fmt}.log').read_text()[-2000:]}")
        synth_s = s["wall_s"] + s["sync_s"]
        src_bytes = dir_bytes(src)
        log(f"[{name}/{fmt}] synthetic checkpoint: {src_bytes / GB:.2f} GB in {synth_s:.1f} s")
        fr = {"source_bytes": src_bytes, "synth_s": round(synth_s, 2), "runs": {}}
        # I/O ceiling: cp -r of the same source on the same disk
        cp_out = base / "cp-out"
        shutil.rmtree(cp_out, ignore_errors=True)
        drop_caches(drop)
        c = run_child(["cp", "-r", str(src), str(cp_out)], log_path=base / "cp.log")
        shutil.rmtree(cp_out, ignore_errors=True)
        c_total = c["wall_s"] + c["sync_s"]
        fr["cp"] = {"wall_s": round(c["wall_s"], 2), "sync_s": round(c["sync_s"], 2), "bytes": src_bytes,
                    "gbps": src_bytes / GB / c_total, "peak_rss": c["peak_rss"]}
        log(f"[{name}/{fmt}] cp -r: {c['wall_s']:.1f}+{c['sync_s']:.1f} s sync, {fr['cp']['gbps']:.2f} GB/s")
        if a.dd:
            drop_caches(drop)
            try:
                fr["dd"] = dd_ceiling(src, base / "dd-scratch", base / "dd.log")
                log(f"[{name}/{fmt}] dd O_DIRECT read + write at once: {fr['dd']['wall_s']:.1f}+"
                    f"{fr['dd']['sync_s']:.1f} s")
            except RuntimeError as e:       # no O_DIRECT here (tmpfs, some overlays): no disk ceiling
                fr["dd_error"] = str(e)
                log(f"[{name}/{fmt}] dd ceiling unavailable: {e}")
        for target in a.targets:
            if target == "onnx" and p.param_count() > a.onnx_max_params:
                fr["runs"][target] = {"skipped": f"onnx skipped above {a.onnx_max_params / 1e9:g}B params "
                                                 "(--onnx-max-params)"}
                log(f"[{name}/{fmt}] {target}: skipped")
                continue
            out = base / f"out-{target}-{fmt}"
            shutil.rmtree(out, ignore_errors=True)
            cmd = [sys.executable, "-m", "mexc.tools.cli", "compile", str(src), "-o", str(out), *TARGETS[target],
                   "--build", "never", "--quiet", *a.compile_args]
            drop_caches(drop)
            r = run_child(cmd, log_path=base / f"compile-{target}-{fmt}.log", timeout=a.timeout)
            run = {"cmd": " ".join(cmd), "rc": r["rc"], "wall_s": round(r["wall_s"], 2),
                   "sync_s": round(r["sync_s"], 2), "peak_rss": r["peak_rss"],
                   "peak_rss_anon": r["peak_rss_anon"], "peak_rss_file": r["peak_rss_file"]}
            if r["rc"] != 0:
                run["error"] = (base / f"compile-{target}-{fmt}.log").read_text(errors="replace")[-2000:]
                fr["runs"][target] = run
                log(f"[{name}/{fmt}] {target}: FAILED rc={r['rc']}: {run['error'][-300:]}")
                continue
            written = dir_bytes(out)
            total = r["wall_s"] + r["sync_s"]
            run.update({"bytes": written, "gbps": written / GB / total,
                        "ratio_cp": (written / GB / total) / fr["cp"]["gbps"],
                        "s_per_gb": total / (written / GB),
                        "largest_output_tensor_bytes": largest_output_tensor(out)})
            run["rss_ok"] = r["peak_rss"] <= res["rss_goal_bytes"]
            run["throughput_ok"] = run["ratio_cp"] >= THROUGHPUT_GOAL if target in THROUGHPUT_TARGETS else None
            if "dd" in fr:
                run["ratio_dd"] = total / (fr["dd"]["wall_s"] + fr["dd"]["sync_s"])
                run["disk_ok"] = run["ratio_dd"] <= DISK_GOAL if target in THROUGHPUT_TARGETS else None
            fr["runs"][target] = run
            log(f"[{name}/{fmt}] {target}: {r['wall_s']:.1f}+{r['sync_s']:.1f} s, {written / GB:.2f} GB, "
                f"{run['gbps']:.2f} GB/s = {run['ratio_cp']:.2f}x cp, peak RSS {r['peak_rss'] / GB:.2f} GB "
                f"(anon {r['peak_rss_anon'] / GB:.2f}, file {r['peak_rss_file'] / GB:.2f})")
            if not a.keep:
                shutil.rmtree(out, ignore_errors=True)
        res["formats"][fmt] = fr
        if not a.keep:
            shutil.rmtree(src, ignore_errors=True)
    if not a.keep:
        shutil.rmtree(base, ignore_errors=True)
    return res


def growth(results: list[dict]) -> list[dict]:
    """Smallest -> largest preset: change of time per GB and of peak RSS, per format and target."""
    if len(results) < 2:
        return []
    lo, hi = min(results, key=lambda r: r["params"]), max(results, key=lambda r: r["params"])
    rows = []
    for fmt, fr in hi["formats"].items():
        for target, run in fr["runs"].items():
            a = lo["formats"].get(fmt, {}).get("runs", {}).get(target, {})
            if "s_per_gb" not in run or "s_per_gb" not in a:
                continue
            rows.append({"format": fmt, "target": target, "from": lo["preset"], "to": hi["preset"],
                         "bytes_ratio": run["bytes"] / a["bytes"],
                         "time_ratio": (run["wall_s"] + run["sync_s"]) / (a["wall_s"] + a["sync_s"]),
                         "s_per_gb_ratio": run["s_per_gb"] / a["s_per_gb"],
                         "rss_ratio": run["peak_rss"] / a["peak_rss"],
                         "rss_delta_gb": (run["peak_rss"] - a["peak_rss"]) / GB})
    return rows


def format_tables(report: dict) -> str:
    lines = []
    for res in report["results"]:
        lines.append(f"\n== {res['preset']}: {res['params'] / 1e9:.2f}B params, largest tensor "
                     f"{res['largest_tensor_bytes'] / GB:.3f} GB, RSS goal {res['rss_goal_bytes'] / GB:.2f} GB")
        hdr = (f"{'format':<11}{'target':<12}{'wall s':>8}{'sync s':>8}{'GB out':>8}{'GB/s':>7}{'x cp':>7}"
               f"{'x dd':>6}{'RSS GB':>8}{'anon':>6}{'file':>6}{'goal':>7}{'s/GB':>8}  ok")
        lines.append(hdr)
        lines.append("-" * len(hdr))
        for fmt, fr in res["formats"].items():
            cp = fr["cp"]
            lines.append(f"{fmt:<11}{'cp -r':<12}{cp['wall_s']:>8.1f}{cp['sync_s']:>8.1f}{cp['bytes'] / GB:>8.2f}"
                         f"{cp['gbps']:>7.2f}{1.0:>7.2f}{'':>6}{cp['peak_rss'] / GB:>8.2f}{'':>19}"
                         f"{1 / cp['gbps']:>8.2f}")
            if "dd_error" in fr:
                lines.append(f"{fmt:<11}{'dd r+w':<12}  unavailable: {fr['dd_error'][:80]}")
            if "dd" in fr:
                dd = fr["dd"]
                lines.append(f"{fmt:<11}{'dd r+w':<12}{dd['wall_s']:>8.1f}{dd['sync_s']:>8.1f}"
                             f"{dd['read_bytes'] / GB:>8.2f}{'':>14}{1.0:>6.2f}")
            for target, run in fr["runs"].items():
                if "skipped" in run:
                    lines.append(f"{fmt:<11}{target:<12}  {run['skipped']}")
                    continue
                if run["rc"] != 0:
                    lines.append(f"{fmt:<11}{target:<12}  FAILED (rc={run['rc']})")
                    continue
                ok = []
                if run["throughput_ok"] is not None:
                    ok.append("tput" if run["throughput_ok"] else "TPUT-MISS")
                if run.get("disk_ok") is not None:
                    ok.append("disk" if run["disk_ok"] else "DISK-MISS")
                ok.append("rss" if run["rss_ok"] else "RSS-MISS")
                lines.append(f"{fmt:<11}{target:<12}{run['wall_s']:>8.1f}{run['sync_s']:>8.1f}"
                             f"{run['bytes'] / GB:>8.2f}{run['gbps']:>7.2f}{run['ratio_cp']:>7.2f}"
                             + (f"{run['ratio_dd']:>6.2f}" if "ratio_dd" in run else f"{'':>6}") +
                             f"{run['peak_rss'] / GB:>8.2f}{run.get('peak_rss_anon', 0) / GB:>6.2f}"
                             f"{run.get('peak_rss_file', 0) / GB:>6.2f}{res['rss_goal_bytes'] / GB:>7.2f}"
                             f"{run['s_per_gb']:>8.2f}"
                             f"  {' '.join(ok)}")
    if report["growth"]:
        g0 = report["growth"][0]
        lines.append(f"\n== growth {g0['from']} -> {g0['to']} (flat time per GB and flat RSS = ratio 1.0)")
        hdr = f"{'format':<11}{'target':<12}{'bytes x':>9}{'time x':>8}{'s/GB x':>8}{'RSS x':>7}{'RSS +GB':>9}"
        lines.append(hdr)
        lines.append("-" * len(hdr))
        for g in report["growth"]:
            lines.append(f"{g['format']:<11}{g['target']:<12}{g['bytes_ratio']:>9.2f}{g['time_ratio']:>8.2f}"
                         f"{g['s_per_gb_ratio']:>8.2f}{g['rss_ratio']:>7.2f}{g['rss_delta_gb']:>9.2f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mexc.tools.bench", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", action="append", choices=sorted(PRESETS), help="repeatable (default: 1b)")
    ap.add_argument("--formats", default="torch,torch_dist")
    ap.add_argument("--targets", default="trtllm,trtllm-tp2,hf,onnx")
    ap.add_argument("--workdir", default="/tmp/mexc-bench", help="all bench data goes here (deleted afterwards)")
    ap.add_argument("--source-tp", type=int, default=2, help="TP of the synthetic checkpoint")
    ap.add_argument("--onnx-max-params", type=float, default=2e9, help="skip onnx above this many parameters")
    ap.add_argument("--timeout", type=float, default=3600, help="per compile, seconds")
    ap.add_argument("--compile-arg", dest="compile_args", action="append", default=[],
                    help="extra argument for every mexc compile (repeatable), e.g. --compile-arg=--jobs=1")
    ap.add_argument("--no-drop-caches", action="store_true", help="keep the page cache between runs")
    ap.add_argument("--no-dd", dest="dd", action="store_false",
                    help="skip the dd O_DIRECT read+write ceiling (file systems without O_DIRECT)")
    ap.add_argument("--keep", action="store_true", help="keep checkpoints and outputs")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON ('-' = stdout)")
    a = ap.parse_args(argv)
    a.preset = a.preset or ["1b"]
    a.formats = [f for f in a.formats.split(",") if f]
    a.targets = [t for t in a.targets.split(",") if t]
    for t in a.targets:
        if t not in TARGETS:
            ap.error(f"unknown target {t!r} (choose from {', '.join(TARGETS)})")
    workdir = Path(a.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    drop = not a.no_drop_caches and can_drop_caches()
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    report = {"machine": machine_info(workdir), "caches_dropped": drop, "argv": sys.argv if argv is None else argv,
              "results": []}
    log(f"page cache dropped before each timed run: {'yes' if drop else 'no'}; output written with O_DIRECT: "
        f"{'yes' if report['machine']['direct_io'] else 'no (MEXC_DIRECT_IO=0)'}")
    try:
        for name in a.preset:
            report["results"].append(bench_preset(name, a, drop, log))
    finally:
        if not a.keep:
            for name in a.preset:
                shutil.rmtree(workdir / name, ignore_errors=True)
            try:
                workdir.rmdir()
            except OSError:
                pass
    report["growth"] = growth(report["results"])
    print(format_tables(report))
    if a.json:
        text = json.dumps(report, indent=2)
        if a.json == "-":
            print(text)
        else:
            Path(a.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
