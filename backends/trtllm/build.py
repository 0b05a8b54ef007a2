"""Engine building with ``trtllm-build`` (TensorRT-LLM <= 1.2.x). Never faked: absent tool -> a note or an error."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

from ...errors import BackendError, ToolNotFoundError


def build_command(out: Path, opts) -> list[str]:
    """The documented trtllm-build invocation for a checkpoint directory (defaults overridable by flags)."""
    return ["trtllm-build", "--checkpoint_dir", str(out), "--output_dir", str(out / "engines"),
            "--max_batch_size", str(opts.max_batch_size), "--max_input_len", str(opts.max_input_len),
            "--max_seq_len", str(opts.max_seq_len), "--gemm_plugin", "auto"]


def require_tool(out: Path, opts) -> None:
    """``--build always`` without trtllm-build fails before anything is read or written."""
    if opts.build == "always" and shutil.which("trtllm-build") is None:
        raise ToolNotFoundError("--build always: trtllm-build (TensorRT-LLM <= 1.2.x) is not installed here; "
                                "nothing was written",
                                hint="use --build auto to write the checkpoint and get the command, then on a machine "
                                     f"with TensorRT-LLM run: {shlex.join(build_command(out, opts))}")


def build_engines(out: Path, opts, log) -> list[str]:
    cmd = build_command(out, opts)
    exe = shutil.which("trtllm-build")
    if exe is None:
        text = shlex.join(cmd)
        if opts.build == "always":
            raise ToolNotFoundError("--build always: trtllm-build (TensorRT-LLM <= 1.2.x) is not installed here",
                                    hint=f"the checkpoint is in {out}; on a machine with TensorRT-LLM run: {text}")
        return [f"TensorRT-LLM is not installed: kept the checkpoint in {out}; build the engines on a GPU "
                f"machine with TensorRT-LLM <= 1.2.x: {text}"]
    log("running " + shlex.join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise BackendError(f"trtllm-build failed (exit {proc.returncode}): " + " | ".join(tail),
                           hint=f"the checkpoint in {out} is complete; rerun the command by hand to see the log")
    engines = sorted((out / "engines").glob("rank*.engine"))
    world = opts.tp * opts.pp
    if len(engines) != world or not (out / "engines" / "config.json").is_file():
        raise BackendError(f"trtllm-build reported success but wrote {len(engines)} of {world} engines",
                           hint="check the TensorRT-LLM version (<= 1.2.x builds from checkpoints)")
    return [f"built {len(engines)} engine(s) in {out / 'engines'}"]
