"""Paired ONNX Runtime benchmark: mexc's ``--target onnx --profile ort`` against onnxruntime-genai's model builder.

The same weights go both ways: a synthetic Megatron checkpoint with smooth weights (:func:`write_smooth_checkpoint`)
is compiled by mexc to ONNX and to a Hugging Face directory; the builder (OGB,
``python -m onnxruntime_genai.models.builder -e cpu``) is fed that HF directory. Each pair (fp32, int4) is then run
with raw ``onnxruntime`` on the CPU provider: batch 1, a prefill of ``--prefill`` tokens
(empty past), then ``--decode`` greedy steps through past/present. Every cycle is a fresh process that creates
both sessions and alternates which one is created first (the first session of a process runs slower); the two
then run in lock step, call by call, the first caller alternating, so that load from other processes falls on
both alike (idle thread pools sleep rather than spin, so neither session steals the other's cores).

Printed: the op histogram of each graph file and of the kernels ORT runs after its optimizer (mean over profiled
decode steps), per-cycle times, and the ratios mexc / OGB of prefill milliseconds per token and of the median
decode step: the geometric mean of the medians over the cycles with mexc created first and with OGB created
first (:func:`balanced`), and their range.

    python -m mexc.tools.bench_onnx --workdir /tmp/mexc-bench-onnx [--preset 250m] [--cycles 6] [--threads 2]
        [--schemes fp32,int4] [--json out.json]

Needs ``onnxruntime-genai`` (its builder needs ``onnx-ir`` too); units: ms per token, wall clock (perf_counter).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .synth_checkpoint import ITERATION, Preset, legacy_rank_state, make_args

PRESETS = {
    # ~250M parameters (issue 21's shape): 16 x 1024, 16 heads / 4 KV heads, ffn 2816, vocab 32000
    "250m": Preset("250m", 16, 1024, 16, 4, 2816, 32000, max_position_embeddings=2048),
    "tiny": Preset("tiny-smooth", 2, 128, 4, 2, 352, 1000, max_position_embeddings=256),
}
SCHEMES = {   # name -> (mexc compile args, OGB precision)
    "fp32": (["--dtype", "float32"], "fp32"),
    "int4": (["--quant", "int4-wo", "--group-size", "32"], "int4"),
    # mexc's int4 before issue 21 (fp32 activations in MatMulNBits, float lm_head), for comparison
    "int4-level0": (["--quant", "int4-wo", "--group-size", "32", "--accuracy-level", "0", "--no-quant-lm-head"],
                    "int4"),
}


# ---------------------------------------------------------------------------------------------- smooth weights


class SmoothFiller:
    """Smooth bf16 tensors: a rank-4 sum of sinusoids over rows and columns, plus 5 % noise, std ~0.02.

    Neighbouring weights are correlated (as in trained matrices, unlike i.i.d. noise), so a model made of them
    has structured logits and a quantization error that can be judged. Same ``tensor`` interface as
    :class:`mexc.tools.synth_checkpoint.Filler`."""

    def __init__(self, seed: int = 0, rank: int = 4, noise: float = 0.05):
        self.g = torch.Generator().manual_seed(seed)
        self.rank, self.noise = rank, noise

    def _wave(self, n: int) -> torch.Tensor:          # [rank, n] smooth rows
        f = torch.rand(self.rank, 1, generator=self.g) * 6 + 0.5     # 0.5-6.5 periods over the axis
        ph = torch.rand(self.rank, 1, generator=self.g) * 6.2832
        return torch.sin(6.2832 * f * torch.arange(n)[None] / n + ph)

    def tensor(self, shape, *, center: float = 0.0) -> torch.Tensor:
        if len(shape) == 1:
            w = 0.1 * self._wave(shape[0])[0]
        else:
            rows, cols = shape[0], int(np.prod(shape[1:]))
            w = (self._wave(rows).t() @ self._wave(cols)) / self.rank ** 0.5
            w = w + self.noise * torch.randn(rows, cols, generator=self.g)
            w = (0.02 / w.std()) * w
        return (w.reshape(shape) + center).to(torch.bfloat16)


def write_smooth_checkpoint(preset: Preset, out: Path, seed: int = 0) -> Path:
    """A legacy-format (``torch``), TP=1 Megatron-LM checkpoint of ``preset`` with :class:`SmoothFiller` weights."""
    out = Path(out)
    d = out / f"iter_{ITERATION:07d}" / "mp_rank_00"
    d.mkdir(parents=True, exist_ok=True)
    model = legacy_rank_state(preset, SmoothFiller(seed), tp=1, pp=1, pp_rank=0)
    args = make_args(preset, tp=1, pp=1, ckpt_format="torch")
    torch.save({"args": args, "checkpoint_version": 3.0, "iteration": ITERATION, "model": model},
               d / "model_optim_rng.pt")
    (out / "latest_checkpointed_iteration.txt").write_text(str(ITERATION))
    return out


def write_word_tokenizer(hf_dir: Path, vocab: int) -> None:
    """A word-level tokenizer of ``vocab`` ids: the builder loads a tokenizer; generation here is from ids."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", bos_token="t1", eos_token="t2",
                            pad_token="t0").save_pretrained(hf_dir)


# ---------------------------------------------------------------------------------------------- builds


def _run(cmd: list[str], log) -> float:
    log("$ " + " ".join(cmd))
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        sys.stderr.write(p.stdout[-4000:] + p.stderr[-4000:])
        raise SystemExit(f"error: {cmd[2] if len(cmd) > 2 else cmd[0]} failed (exit {p.returncode}); output above")
    return time.perf_counter() - t


def build_all(work: Path, preset: Preset, schemes: list[str], log) -> dict[str, dict[str, Path]]:
    """Checkpoint, mexc ONNX per scheme, mexc HF (+ tokenizer), OGB ONNX per scheme; reused when present."""
    py = sys.executable
    ckpt = work / "ckpt"
    if not (ckpt / "latest_checkpointed_iteration.txt").exists():
        log(f"writing the smooth {preset.name} checkpoint ({preset.param_count(1) / 1e6:.0f}M params) to {ckpt}")
        write_smooth_checkpoint(preset, ckpt)
    hf = work / "hf"
    if not (hf / "tokenizer.json").exists():
        _run([py, "-m", "mexc.tools.cli", "compile", str(ckpt), "--target", "hf", "--dtype", "float32",
              "--vocab-size", str(preset.vocab_size), "-o", str(hf), "--force", "--quiet"], log)
        write_word_tokenizer(hf, preset.vocab_size)
    out: dict[str, dict[str, Path]] = {}
    for s in schemes:
        margs, prec = SCHEMES[s]
        m, o = work / f"mexc-{s}", work / f"ogb-{prec}"
        if not (m / "model.onnx").exists():
            dt = _run([py, "-m", "mexc.tools.cli", "compile", str(ckpt), "--target", "onnx", "--profile", "ort",
                       "--vocab-size", str(preset.vocab_size), *margs, "-o", str(m), "--force", "--quiet"], log)
            log(f"  mexc {s}: {dt:.1f} s")
        if not (o / "model.onnx").exists():
            dt = _run([py, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(o), "-p", prec,
                       "-e", "cpu", "-c", str(work / "ogb-cache")], log)
            log(f"  OGB {s}: {dt:.1f} s")
        out[s] = {"mexc": m / "model.onnx", "ogb": o / "model.onnx"}
    return out


# ---------------------------------------------------------------------------------------------- running


def session(path: Path, threads: int, profile_prefix: str | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # idle pools sleep: two sessions live side by side, and a spinning pool would steal the other's cores
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


class Runner:
    """Prefill + greedy decode of one session, feeding inputs by the names the graph declares."""

    def __init__(self, sess, head_size: int):
        self.sess = sess
        self.head_size = head_size          # OGB declares the cache's last dim symbolic (kv_cache_dim)
        self.inputs = {i.name: i for i in sess.get_inputs()}
        self.outputs = [o.name for o in sess.get_outputs()]
        self.past = [n for n in self.inputs if n.startswith("past_key_values.")]

    def _feed(self, ids: np.ndarray, past: dict | None, past_len: int) -> dict:
        s = ids.shape[1]
        feed = {"input_ids": ids, "attention_mask": np.ones((1, past_len + s), np.int64)}
        if "position_ids" in self.inputs:
            feed["position_ids"] = np.arange(past_len, past_len + s, dtype=np.int64)[None]
        for n in self.past:
            i = self.inputs[n]
            feed[n] = past[n] if past else np.zeros((1, i.shape[1], 0, self.head_size), np.float32)
        return feed

    def step(self, ids, past, past_len):
        outs = dict(zip(self.outputs, self.sess.run(None, self._feed(ids, past, past_len))))
        return outs["logits"], {n: outs[n.replace("past_key_values.", "present.")] for n in self.past}

    def timed(self, ids, past, past_len):
        """(wall seconds, CPU seconds of this process: ORT's threads included), logits, present."""
        t, c = time.perf_counter(), time.process_time()
        logits, past = self.step(ids, past, past_len)
        return (time.perf_counter() - t, time.process_time() - c), logits, past


def lockstep(runners: dict[str, Runner], order: list[str], prompt: np.ndarray, steps: int) -> dict:
    """Prefill then ``steps`` greedy decode steps of every runner, interleaved call by call (the first runner
    alternates every step), so that load from outside hits both alike. Per runner: the prefill time and the
    decode step times (s), the greedy tokens, the prefill's last-token logits."""
    st = {k: {"decode": [], "decode_cpu": [], "past": None} for k in order}
    for k in order:
        dt, logits, st[k]["past"] = runners[k].timed(prompt, None, 0)
        st[k]["prefill"], st[k]["prefill_cpu"] = dt
        st[k]["last_logits"] = logits[0, -1].astype(np.float32)
        st[k]["tokens"] = [int(st[k]["last_logits"].argmax())]
    n = prompt.shape[1]
    for i in range(steps):
        for k in (order if i % 2 == 0 else order[::-1]):
            dt, logits, st[k]["past"] = runners[k].timed(np.array([[st[k]["tokens"][-1]]], np.int64),
                                                         st[k]["past"], n)
            st[k]["decode"].append(dt[0])
            st[k]["decode_cpu"].append(dt[1])
            st[k]["tokens"].append(int(logits[0, -1].argmax()))
        n += 1
    for k in order:
        del st[k]["past"]
    return st


def runner(path: Path, threads: int, profile_prefix: str | None = None) -> Runner:
    cfg = json.loads((Path(path).parent / "genai_config.json").read_text())
    return Runner(session(path, threads, profile_prefix), cfg["model"]["decoder"]["head_size"])


def graph_histogram(path: Path) -> dict[str, int]:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return dict(collections.Counter((n.domain + "." if n.domain else "") + n.op_type for n in m.graph.node))


def kernel_histogram(path: Path, threads: int, prompt: np.ndarray, tmp: Path, steps: int = 8) -> dict[str, list]:
    """Op -> [kernels per step, µs per step] that ORT ran (after its optimizer), averaged over ``steps`` decode
    steps that follow the prefill and two unprofiled-in-the-mean decode steps."""
    r = runner(path, threads, str(tmp / "prof"))
    _, past = r.step(prompt, None, 0)
    n = prompt.shape[1]
    for _ in range(steps + 2):
        _, past = r.step(np.array([[1]], np.int64), past, n)
        n += 1
    prof = Path(r.sess.end_profiling())
    events = json.loads(prof.read_text())
    prof.unlink()
    runs = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    start = runs[-steps]
    hist: dict[str, list] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start:
            h = hist.setdefault(e["args"]["op_name"], [0, 0.0])
            h[0] += 1 / steps
            h[1] += e["dur"] / steps
    return dict(sorted(hist.items(), key=lambda kv: -kv[1][1]))


def one_cycle(paths: dict[str, str], order: list[str], threads: int, prefill: int, vocab: int, decode: int) -> dict:
    """One cycle, run in a fresh process (:func:`bench_pair`): sessions created in ``order``, a warm-up, then
    prefill + ``decode`` steps in lock step."""
    prompt = np.random.default_rng(0).integers(3, vocab, (1, prefill), dtype=np.int64)
    runners = {k: runner(Path(paths[k]), threads) for k in order}
    lockstep(runners, order, prompt[:, :16], 4)                      # warm-up (allocations, first touch)
    res = lockstep(runners, order, prompt, decode)
    for v in res.values():
        v["last_logits"] = v["last_logits"].tolist()
    return res


def bench_pair(paths: dict[str, Path], a, vocab: int, log) -> dict:
    """``a.cycles`` cycles, each in a fresh process (no heap or cache state carried from one to the next); each
    creates both sessions, the first one alternating, and runs them in lock step. Per cycle: prefill ms per
    token and the median decode step."""
    cycles = []
    for c in range(a.cycles):
        order = ["mexc", "ogb"] if c % 2 == 0 else ["ogb", "mexc"]
        job = json.dumps({"paths": {k: str(v) for k, v in paths.items()}, "order": order, "threads": a.threads,
                          "prefill": a.prefill, "vocab": vocab, "decode": a.decode})
        p = subprocess.run([sys.executable, "-m", "mexc.tools.bench_onnx", "--one-cycle", job], capture_output=True,
                           text=True)
        if p.returncode:
            sys.stderr.write(p.stderr[-4000:])
            raise SystemExit(f"error: benchmark cycle {c} failed (exit {p.returncode}); output above")
        res = json.loads(p.stdout.strip().splitlines()[-1])
        for v in res.values():
            v["last_logits"] = np.asarray(v["last_logits"], np.float32)
        row = {k: {"prefill_ms_tok": 1e3 * res[k]["prefill"] / a.prefill,
                   "decode_ms_tok": 1e3 * float(np.median(res[k]["decode"])),
                   "prefill_cpu_ms_tok": 1e3 * res[k]["prefill_cpu"] / a.prefill,
                   "decode_cpu_ms_tok": 1e3 * float(np.median(res[k]["decode_cpu"]))} for k in order}
        row["first"] = order[0]
        row["same_tokens"] = sum(x == y for x, y in zip(res["mexc"]["tokens"], res["ogb"]["tokens"]))
        row["logit_diff"] = float(np.abs(res["mexc"]["last_logits"] - res["ogb"]["last_logits"]).max())
        cycles.append(row)
        log(f"  cycle {c} ({order[0]} first): prefill {row['mexc']['prefill_ms_tok']:.2f} / "
            f"{row['ogb']['prefill_ms_tok']:.2f} ms/tok, decode {row['mexc']['decode_ms_tok']:.2f} / "
            f"{row['ogb']['decode_ms_tok']:.2f} ms/tok (mexc / OGB, median step; CPU ms "
            f"{row['mexc']['prefill_cpu_ms_tok']:.2f} / {row['ogb']['prefill_cpu_ms_tok']:.2f}, "
            f"{row['mexc']['decode_cpu_ms_tok']:.2f} / {row['ogb']['decode_cpu_ms_tok']:.2f}); greedy tokens equal "
            f"{row['same_tokens']}/{a.decode + 1}, max |d last logits| {row['logit_diff']:.2e}")
    return {"cycles": cycles, **balanced(cycles), "last": res}


def balanced(cycles: list[dict]) -> dict:
    """Ratios mexc / OGB: the geometric mean of the median ratio of the cycles where mexc was created first and of
    those where OGB was (the first session of a process runs slower, so this cancels the order), and the range."""
    ratio, spread = {}, {}
    for k in ("prefill_ms_tok", "decode_ms_tok", "prefill_cpu_ms_tok", "decode_cpu_ms_tok"):
        by = [[r["mexc"][k] / r["ogb"][k] for r in cycles if r["first"] == f] for f in ("mexc", "ogb")]
        meds = [float(np.median(v)) for v in by if v]
        ratio[k] = float(np.prod(meds) ** (1 / len(meds)))
        spread[k] = [float(min(min(v) for v in by if v)), float(max(max(v) for v in by if v))]
    return {"ratio": ratio, "spread": spread}


# ---------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mexc.tools.bench_onnx", description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="/tmp/mexc-bench-onnx", help="checkpoint and builds (reused when present)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="250m")
    ap.add_argument("--schemes", default="fp32,int4", help="comma list of " + ", ".join(SCHEMES))
    ap.add_argument("--cycles", type=int, default=6, help="paired cycles per scheme (order alternates)")
    ap.add_argument("--prefill", type=int, default=128)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="write the report here")
    ap.add_argument("--one-cycle", help=argparse.SUPPRESS)             # internal: one cycle, JSON job description
    a = ap.parse_args(argv)
    if a.one_cycle:
        print(json.dumps(one_cycle(**json.loads(a.one_cycle))))
        return 0
    schemes = [s for s in a.schemes.split(",") if s]
    if bad := [s for s in schemes if s not in SCHEMES]:
        ap.error(f"unknown scheme {bad[0]!r} (choose from {', '.join(SCHEMES)})")
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    try:
        import onnxruntime
        import onnxruntime_genai  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"error: {e.name} is not installed (hint: pip install onnxruntime-genai onnx-ir)") from None
    p = PRESETS[a.preset]
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    paths = build_all(work, p, schemes, log)
    prompt = np.random.default_rng(0).integers(3, p.vocab_size, (1, a.prefill), dtype=np.int64)   # as one_cycle's
    report = {"preset": a.preset, "params": p.param_count(1), "threads": a.threads, "prefill": a.prefill,
              "decode": a.decode, "onnxruntime": onnxruntime.__version__,
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs", "schemes": {}}
    ref = None
    for s in schemes:
        log(f"{s}: {a.cycles} paired cycles, batch 1, prefill {a.prefill}, {a.decode} greedy steps, "
            f"{a.threads} threads")
        r = bench_pair(paths[s], a, p.vocab_size, log)
        last = r.pop("last")
        if s == "fp32":
            ref = last["mexc"]
        elif ref is not None:   # each quantized graph against the fp32 one: prefill logits and greedy tokens
            r["vs_fp32"] = {k: {"max_abs_logit_err": float(np.abs(v["last_logits"] - ref["last_logits"]).max()),
                                "logit_range": float(np.ptp(ref["last_logits"])),
                                "tokens_equal": sum(x == y for x, y in zip(v["tokens"], ref["tokens"]))}
                            for k, v in last.items()}
        r["graph_ops"] = {k: graph_histogram(v) for k, v in paths[s].items()}
        r["kernels"] = {k: kernel_histogram(v, a.threads, prompt, work) for k, v in paths[s].items()}
        report["schemes"][s] = r
    print(format_report(report))
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1))
    return 0


def format_report(rep: dict) -> str:
    lines = [f"preset {rep['preset']} ({rep['params'] / 1e6:.0f}M params), onnxruntime {rep['onnxruntime']} CPU, "
             f"{rep['threads']} threads, batch 1, prefill {rep['prefill']}, {rep['decode']} greedy decode steps",
             "", "Ratios mexc / OGB (geometric mean of the per-creation-order medians; range over cycles); wall = "
             "elapsed, CPU = this process's CPU time (ORT's threads included), which load from other processes "
             "disturbs less", "",
             "| scheme | prefill ms/token, wall | decode ms/token, wall | prefill, CPU | decode, CPU | "
             "greedy tokens equal |", "|---|---|---|---|---|---|"]
    for s, r in rep["schemes"].items():
        eq = min(c["same_tokens"] for c in r["cycles"])
        cells = [f"x{r['ratio'][k]:.3f} (x{r['spread'][k][0]:.2f}-{r['spread'][k][1]:.2f})"
                 for k in ("prefill_ms_tok", "decode_ms_tok", "prefill_cpu_ms_tok", "decode_cpu_ms_tok")]
        lines.append(f"| {s} | {' | '.join(cells)} | {eq}/{rep['decode'] + 1} |")
    for s, r in rep["schemes"].items():
        for k, v in r.get("vs_fp32", {}).items():
            lines.append(f"{s} {k} vs the fp32 graph: max |d prefill last-token logits| {v['max_abs_logit_err']:.3g} "
                         f"(fp32 logit range {v['logit_range']:.3g}), greedy tokens equal {v['tokens_equal']}/"
                         f"{rep['decode'] + 1}")
    for s, r in rep["schemes"].items():
        for k in ("mexc", "ogb"):
            ops = ", ".join(f"{o} {n}" for o, n in sorted(r["graph_ops"][k].items()))
            lines.append(f"\n{s} {k} graph ({sum(r['graph_ops'][k].values())} nodes): {ops}")
            ker = ", ".join(f"{o} {n:.0f}x {us / 1e3:.2f} ms" for o, (n, us) in r["kernels"][k].items())
            tot = sum(us for _, us in r["kernels"][k].values()) / 1e3
            lines.append(f"{s} {k} kernels per decode step after ORT's optimizer ({tot:.2f} ms): {ker}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
