"""The compile driver: lift -> passes (user pipeline + the backend's legalization) -> check -> emit -> build.

``compile_checkpoint`` is what ``mexc compile`` calls; it is also the library entry point.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .backends.registry import BUILTIN, get_backend  # noqa: F401 - re-exported; stdlib only, like this module
from .errors import BackendError, UsageError

if TYPE_CHECKING:   # the heavy modules (torch) load inside the functions: `mexc compile` judges flags first
    from .backends.base import Backend, CompileOptions, EmitResult
    from .ir import Model

TARGETS = tuple(BUILTIN)   # the built-in targets; plugins: mexc.backends.registry.target_names()


def lift(ckpt: str | Path, *, iteration: int | None = None, config: str | Path | None = None,
         overrides: dict | None = None) -> Model:
    """Lift a checkpoint (Megatron, or an installed frontend's format: :mod:`mexc.frontends.registry`);
    ``config`` (YAML) and ``overrides`` (flags) fix what its args lack."""
    from .frontends.registry import lift as registry_lift

    return registry_lift(ckpt, iteration=iteration, config=config, overrides=overrides)


def frontend_record(model: Model, *, overrides: dict | None = None, config: str | Path | None = None,
                    iteration: int | None = None) -> dict:
    """What the manifest records of the lift's own choices (``--replicated``, unjudged saved arguments) and of
    the flags that changed it, so that ``mexc verify`` lifts ``--against`` the same way: ``set`` (the ``--set``
    fields, token ids included), ``config`` (``{"path", "fields"}``: the ``--config`` file's YAML content as
    read at compile time) and ``iteration`` (``--iteration``; null: the latest)."""
    record = {"replicated": model.meta.get("replicated", "check"),
              "unknown_args": [a for a in model.meta.get("unknown_args", "").split(",") if a],
              "set": {k: v for k, v in (overrides or {}).items() if k != "replicated"}, "iteration": iteration}
    if config is not None:
        from .frontends.megatron.config import load_overrides

        record["config"] = {"path": str(Path(config).resolve()), "fields": load_overrides(config)}
    return record


def build_pipeline(model: Model, opts: CompileOptions, backend: Backend) -> list:
    """User passes (after trim-vocab for --vocab-size), with the backend's legalization where ``--pipeline``
    says ``legalize``, else after them. Legalization passes carry ``origin = "legalize"`` (the
    :class:`~mexc.passes.instruments.ChoiceGuard` tells the user's choices from the target's)."""
    from .passes import parse_pipeline
    from .passes.pipeline import LEGALIZE

    text = opts.pipeline.strip()
    if opts.vocab_size is not None:
        text = ",".join(filter(None, [f"trim-vocab{{size={opts.vocab_size}}}", text]))
    user = parse_pipeline(text, markers=(LEGALIZE,))
    for p in user:
        if p != LEGALIZE and p.name == "reshard" and (p.tp, p.pp, p.ep) != (opts.tp, opts.pp, opts.ep):
            raise UsageError(f"--pipeline has {p} but the target layout is --tp {opts.tp} --pp {opts.pp} "
                             f"--ep {opts.ep}", hint="set the layout with --tp/--pp/--ep; the backend adds reshard")
    legal = backend.legalize(opts, model)
    for p in legal:
        p.origin = "legalize"
    at = user.index(LEGALIZE) if LEGALIZE in user else len(user)
    return user[:at] + legal + user[at + 1:]


def check_apart(ckpt: str | Path, out: str | Path) -> None:
    """Refuse an output directory that is the checkpoint, contains it, or lies inside it (compared as real
    paths, links resolved): writing or ``--force`` there would change the checkpoint itself."""
    src, dst = os.path.realpath(ckpt), os.path.realpath(out)
    if dst == src or src.startswith(dst.rstrip(os.sep) + os.sep):
        raise UsageError(f"{out}: the output directory is the checkpoint or contains it ({ckpt})",
                         hint="choose an -o outside the checkpoint; --force would delete the checkpoint")
    if dst.startswith(src.rstrip(os.sep) + os.sep):
        raise UsageError(f"{out}: the output directory is inside the checkpoint ({ckpt})",
                         hint="choose an -o outside the checkpoint directory")


_HINT = re.compile(r"\s*\(hint: (.*)\)\s*$")


def lowering_error(target: str, problems: list[str], others: tuple[list[str], str] | None = None) -> BackendError:
    """One error for what ``backend.check`` found: the problems on the error line, their own ``(hint: ...)``
    parts moved to the one hint line (never a second hint after the first). ``others``: the built-in targets
    that do take the model and the flags they take it without (:func:`targets_taking`), named on the hint line."""
    texts, hints = [], []
    for p in problems:
        m = _HINT.search(p)
        texts.append(p[:m.start()] if m else p)
        if m and m.group(1) not in hints:
            hints.append(m.group(1))
    if others is not None:
        names, without = others
        how = f"without {without}" if without else "as it is"
        hints.append(f"targets that take this model {how}: {', '.join(f'--target {t}' for t in names)}" if names
                     else "no built-in target takes this model as it is")
    return BackendError(f"the {target} target cannot lower this model: " + "; ".join(texts),
                        hint="; ".join(hints) or "see docs/targets.md for what each target supports")


_CARRIED = {"tp": "--tp", "pp": "--pp", "ep": "--ep", "dtype": "--dtype", "quant": "--quant",
            "group_size": "--group-size"}


def targets_taking(lift_again: Callable[[], Model], opts: CompileOptions) -> tuple[list[str], str]:
    """The built-in targets other than ``opts.target`` whose legalization and ``check`` accept the model, each
    on a fresh lift (lazy: no tensor is read), with the user's layout, dtype and quantization flags; when none
    does, those that take it with their defaults, and the flags they take it without (``"--quant, --tp"``).
    Asked only on a refusal, so that its hint never sends a user to a target that refuses the model too."""
    from .backends.options import CompileOptions
    from .passes import PassManager

    given = {k: getattr(opts, k) for k, d in ((f, CompileOptions.__dataclass_fields__[f].default) for f in _CARRIED)
             if getattr(opts, k) != d}

    def probe(fields: dict) -> list[str]:
        ok = []
        for t in BUILTIN:
            if t == opts.target or t == "tensorrt":    # tensorrt takes what onnx's tensorrt profile takes
                continue
            try:
                model, o, backend = lift_again(), CompileOptions(target=t, **fields), get_backend(t)
                o.validate()
                PassManager(build_pipeline(model, o, backend))(model)
                if not backend.check(model, o):
                    ok.append(t)
            except Exception:   # noqa: BLE001 - a best-effort hint on an error path: never a second failure
                pass
        return ok

    with_flags = probe(given)
    if with_flags or not given:
        return with_flags, ""
    return probe({}), ", ".join(_CARRIED[k] for k in given)


@dataclass
class CompileResult:
    out: Path
    target: str
    pipeline: str
    emit: EmitResult
    seconds: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {"out": str(self.out), "target": self.target, "pipeline": self.pipeline,
                "files": self.emit.files, "bytes": sum(self.emit.files.values()), "tensors": self.emit.tensors,
                "seconds": {k: round(v, 3) for k, v in self.seconds.items()}, "notes": self.notes}


def compile_checkpoint(ckpt: str | Path, out: str | Path, opts: CompileOptions, *, iteration: int | None = None,
                       config: str | Path | None = None, overrides: dict | None = None,
                       load: list[str] | tuple = (),
                       print_ir_after: set[str] | None = None, dump_ir: Path | None = None,
                       log: Callable[[str], None] | None = None, progress=None,
                       tokenizer: str | Path | None = None, instruments: list | tuple = ()) -> CompileResult:
    """Compile the Megatron checkpoint ``ckpt`` to ``out`` (written atomically) with ``opts``, the target's
    options class (:mod:`mexc.backends.options`; ``CompileOptions(target=..., ...)`` builds it). ``tokenizer`` (a path) or the
    one the checkpoint's args name is written beside the model (:mod:`mexc.frontends.tokenizer`).
    ``instruments``: extra :mod:`pass instruments <mexc.passes.instruments>` (``SemanticCheck()``)."""
    from .backends.base import atomic_directory, check_output, intra_op_threads, tune_allocator, write_manifest
    from .backends.layout import check_group_size, check_layout, check_print_ir_after, fit_sequence
    from .backends.options import for_target
    from .frontends import tokenizer as tokenizers
    from .passes import PassManager, format_pipeline, load_entry_point_passes, load_pass_file

    log = log or (lambda s: None)
    opts = for_target(opts)   # a bare CompileOptions gets its target's class and defaults (backends/options.py)
    opts.validate()
    backend = get_backend(opts.target)
    out = Path(out)
    check_apart(ckpt, out)
    check_output(out, opts.force)
    backend.preflight(out, opts)
    for f in load:
        load_pass_file(f)
    load_entry_point_passes()
    t0 = time.perf_counter()
    given = dict(overrides or {})   # as the user gave them: recorded in the manifest for `mexc verify`
    overrides, id_overrides = tokenizers.split_overrides(overrides)
    from .frontends.registry import frontend_for

    fe_name, fe = frontend_for(ckpt)
    tok = tokenizers.resolve(ckpt, tokenizer, iteration) if fe is None or tokenizer is not None else \
        tokenizers.Resolved(why_missing=f"the {fe_name} frontend reads no tokenizer")
    model = lift(ckpt, iteration=iteration, config=config, overrides=overrides)
    t1 = time.perf_counter()
    if model.meta.get("unknown_args"):  # one line: the argument table does not know these (docs/arguments.md)
        unknown = model.meta["unknown_args"].split(",")
        log(f"warning: {len(unknown)} saved argument(s) not in mexc's argument table, not judged: "
            f"{', '.join(unknown[:12])}{' ...' if len(unknown) > 12 else ''} (`mexc inspect --args CKPT`)")
    log(f"lifted {model.config.family} model: {model.config.num_layers} layers, "
        f"{model.param_count() / 1e6:.2f}M params ({model.meta.get('format')}, tp={model.meta.get('source_tp')} "
        f"pp={model.meta.get('source_pp')})")
    saved_vocab = model.config.vocab_size  # the args' vocabulary; equal to the padded rows when they had none
    emb = next(iter(model.graph.find(op="embedding")), None)
    padded_rows = emb.params["word"].type.shape[0] if emb is not None and "word" in emb.params else saved_vocab
    if opts.vocab_size is not None and opts.vocab_size < saved_vocab < padded_rows:
        raise UsageError(f"--vocab-size {opts.vocab_size} is below the checkpoint's vocabulary of {saved_vocab} ids "
                         f"(from its saved args): ids {opts.vocab_size}..{saved_vocab - 1} would be lost",
                         hint=f"drop --vocab-size, or give at least {saved_vocab} (it only trims Megatron's padding "
                              "rows)")
    vocab, vocab_note = tokenizers.default_vocab(model, tok) if opts.vocab_size is None else (None, None)
    if vocab is not None:
        opts.vocab_size = vocab
    seq_note = fit_sequence(model, opts) if hasattr(opts, "max_seq_len") else None
    passes = build_pipeline(model, opts, backend)
    check_layout(model, passes)
    check_group_size(model, passes)
    check_print_ir_after(print_ir_after or set(), passes)
    pm = PassManager(passes, print_ir_after=print_ir_after or set(), dump_ir=dump_ir, log=log,
                     instruments=list(instruments))
    pm(model)
    pipeline_text = format_pipeline(passes)
    tokenizers.attach(model, tok, id_overrides)
    t2 = time.perf_counter()
    problems = backend.check(model, opts)
    if problems:
        others = targets_taking(lambda: lift(ckpt, iteration=iteration, config=config, overrides=overrides), opts)
        raise lowering_error(opts.target, problems, others)
    tune_allocator()
    with atomic_directory(out, opts.force, log=log) as tmp, intra_op_threads(1):
        res = backend.emit(model, tmp, opts, progress=progress)
        if tok.tok is not None:
            res.files.update(tokenizers.write(tok.tok, tmp))
        write_manifest(tmp, model=model, opts=opts, pipeline=pipeline_text, checksums=res.checksums,
                       extra={**tok.manifest(), "frontend": frontend_record(model, overrides=given, config=config,
                                                                             iteration=iteration)})
    res.out = out
    t3 = time.perf_counter()
    notes = list(res.notes) + [n for n in (model.meta.get("lift_note"), vocab_note, seq_note) if n]
    if tok.tok is None:
        notes.append(tokenizers.missing_note(tok.why_missing))
    if opts.build != "never":
        notes += backend.build(out, opts, log)
    t4 = time.perf_counter()
    return CompileResult(out, opts.target, pipeline_text, res,
                         {"lift": t1 - t0, "passes": t2 - t1, "emit": t3 - t2, "build": t4 - t3}, notes)
