"""``mexc run OUT --prompt TEXT`` (or ``--prompt-ids 1,2,3``): greedy generation from a compiled output, here.

* ``hf`` outputs run through ``transformers`` (``AutoModelForCausalLM`` + ``AutoTokenizer``, ``generate`` with
  ``do_sample=False``);
* ``onnx`` outputs of the ``ort`` profile run through onnxruntime-genai (``og.Model``, ``og.Tokenizer``,
  ``og.Generator`` with greedy search), exactly what a deployment with onnxruntime-genai does.

``trtllm`` and ``tensorrt`` outputs need a GPU and TensorRT(-LLM): the error prints the command that serves
them. Every output needs its tokenizer files (``mexc compile --tokenizer`` or ``mexc tokenizer OUT --from``).
Errors: :class:`~mexc.errors.InputError` (not a mexc output, wrong output kind, no tokenizer; exit 1),
:class:`~mexc.errors.UsageError` (a prompt that does not fit; exit 2), ToolNotFoundError (runtime absent).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BackendError, InputError, ToolNotFoundError, UsageError

MANIFEST = "mexc-manifest.json"


@dataclass
class Generation:
    """One greedy generation: the prompt's ids, the new ids, the decoded new text, the runtime, seconds."""

    runtime: str
    prompt_ids: list[int]
    new_ids: list[int]
    text: str
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {"runtime": self.runtime, "prompt_ids": self.prompt_ids, "new_ids": self.new_ids,
                "text": self.text, "seconds": round(self.seconds, 3)}


def read_manifest(out: Path) -> dict:
    """The output's manifest; InputError when ``out`` is not a mexc output."""
    path = out / MANIFEST
    if not out.is_dir():
        raise InputError(f"{out}: no such directory", hint="give the -o directory of `mexc compile`")
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError):
        raise InputError(f"{out}: not a mexc output (no readable {MANIFEST})",
                         hint="give the -o directory of `mexc compile`") from None
    if not isinstance(m, dict) or m.get("producer") != "mexc":
        raise InputError(f"{path}: not written by mexc", hint="give the -o directory of `mexc compile`")
    return m


def has_tokenizer(out: Path) -> bool:
    return (out / "tokenizer.json").is_file() or (out / "tokenizer_config.json").is_file()


def gpu_hint(out: Path, target: str) -> str:
    """One short hint for an output that runs on a GPU: the first serve command (``mexc compile`` prints them
    all), with the tokenizer step first when the output has none."""
    import shlex

    from ..backends.serve import MISSING, serve_commands

    if target == "tensorrt":
        return ("build and run its engine on a GPU machine with TensorRT >= 10.15 (the trtexec command and the "
                "Python API: docs/onnx.md)")
    q = shlex.quote(str(out))
    cmd = next((c.split("   (")[0] for c in serve_commands(out) if not c.startswith("first add")), None)
    if cmd is None:
        return "serve it on a GPU machine (docs/targets.md)"
    first = "" if has_tokenizer(out) else f"mexc tokenizer {q} --from PATH, then "
    return f"on a GPU machine: {first}{cmd.replace(MISSING, q)} (other ways: docs/targets.md)"


def generate(out: str | Path, prompt: str | None, max_new_tokens: int = 16,
             prompt_ids: list[int] | None = None) -> Generation:
    """Greedy generation of up to ``max_new_tokens`` tokens after ``prompt`` (stops at eos); or after the token
    ids ``prompt_ids`` (no tokenizer needed: a model trained with NullTokenizer; ``text`` is then empty)."""
    out = Path(out)
    manifest = read_manifest(out)
    target = manifest.get("target")
    if target in ("trtllm", "tensorrt"):
        raise InputError(f"{out}: a {target} output runs on a GPU with TensorRT{'-LLM' if target == 'trtllm' else ''}"
                         ", not here", hint=gpu_hint(out, target))
    if prompt_ids is not None:
        vocab = manifest.get("model", {}).get("vocab_size")
        bad = [i for i in prompt_ids if not 0 <= i < (vocab or 1 << 31)]
        if not prompt_ids or bad:
            raise UsageError(f"--prompt-ids: {'no ids' if not prompt_ids else f'id {bad[0]} is outside'} "
                             f"the vocabulary of {vocab}", hint="give ids like --prompt-ids 1,2,3")
    elif not has_tokenizer(out):
        raise InputError(f"{out}: has no tokenizer files (tokenizer.json), so text cannot be encoded",
                         hint=f"add one: mexc tokenizer {out} --from PATH")
    if target == "hf":
        return _run_hf(out, prompt, max_new_tokens, prompt_ids)
    if target == "onnx":
        if not (out / "genai_config.json").is_file():
            raise InputError(f"{out}: an ONNX output of the tensorrt profile has no genai_config.json",
                             hint="compile with --profile ort to run it with onnxruntime-genai")
        return _run_onnx(out, prompt, max_new_tokens, prompt_ids)
    raise InputError(f"{out}: unknown target {target!r} in its manifest", hint="recompile it with this mexc")


def _run_hf(out: Path, prompt: str | None, n: int, prompt_ids: list[int] | None = None) -> Generation:
    try:
        import torch
        import transformers
    except ImportError:
        raise ToolNotFoundError("running an hf output needs transformers", hint="pip install 'mexc[hf]'") from None
    t0 = time.perf_counter()
    transformers.utils.logging.disable_progress_bar()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True, dtype=torch.float32)
    model.eval()
    if prompt_ids is None:
        tok = transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True)
        ids = tok(prompt, return_tensors="pt")
        eos, pad = tok.eos_token_id, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    else:
        tok = None
        ids = {"input_ids": torch.tensor([prompt_ids]), "attention_mask": torch.ones(1, len(prompt_ids), dtype=torch.long)}
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        pad = eos if not isinstance(eos, list) else eos[0]
    p = ids["input_ids"].shape[1]
    if p == 0:
        raise UsageError(f"the prompt {prompt!r} encodes to no tokens", hint="give a longer prompt")
    n = _budget(p, n, model.config.max_position_embeddings)
    with torch.no_grad():
        seq = model.generate(**ids, do_sample=False, num_beams=1, max_new_tokens=n, min_new_tokens=0,
                             pad_token_id=pad, eos_token_id=eos)[0].tolist()
    new = seq[p:]
    text = str(tok.decode(new, skip_special_tokens=True)) if tok is not None else ""
    return Generation("transformers " + transformers.__version__, seq[:p], new, text, time.perf_counter() - t0)


def _run_onnx(out: Path, prompt: str | None, n: int, prompt_ids: list[int] | None = None) -> Generation:
    try:
        import onnxruntime_genai as og
    except ImportError:
        raise ToolNotFoundError("running an onnx output needs onnxruntime-genai",
                                hint="pip install onnxruntime-genai") from None
    t0 = time.perf_counter()
    cfg = json.loads((out / "genai_config.json").read_text())
    try:
        model = og.Model(str(out))
        tok = og.Tokenizer(model) if prompt_ids is None else None
    except Exception as e:   # og raises plain RuntimeError / OrtException for any file problem
        raise BackendError(f"{out}: onnxruntime-genai cannot load it: {str(e).splitlines()[0]}",
                           hint="recompile it with --profile ort") from None
    if prompt_ids is None:
        prompt_ids = [int(i) for i in tok.encode(prompt)]
    if not prompt_ids:
        raise UsageError(f"the prompt {prompt!r} encodes to no tokens", hint="give a longer prompt")
    n = _budget(len(prompt_ids), n, cfg["model"]["context_length"])
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt_ids) + n)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt_ids)
    while not gen.is_done():
        gen.generate_next_token()
    seq = [int(i) for i in gen.get_sequence(0)]
    new = seq[len(prompt_ids):]
    eos = cfg["model"].get("eos_token_id")
    eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    shown = [i for i in new if i not in eos]
    return Generation("onnxruntime-genai " + og.__version__, prompt_ids, new,
                      str(tok.decode(shown)) if tok is not None else "", time.perf_counter() - t0)


def _budget(prompt_len: int, n: int, context: int) -> int:
    """New tokens that fit in the context window (positions are learned or rope-scaled up to ``context``)."""
    if prompt_len >= context:
        raise UsageError(f"the prompt is {prompt_len} tokens, the model's context is {context}",
                         hint="give a shorter prompt")
    return max(0, min(n, context - prompt_len))


def cmd_run(a) -> int:
    g = generate(a.out, a.prompt, a.max_new_tokens, a.prompt_ids)
    if a.json:
        print(json.dumps(g.summary(), indent=2))
    else:
        print(" ".join(map(str, g.prompt_ids + g.new_ids)) if a.prompt_ids is not None else f"{a.prompt}{g.text}")
        print(f"({g.runtime}, greedy, {len(g.new_ids)} new tokens, {g.seconds:.2f}s)", file=sys.stderr)
    return 0
