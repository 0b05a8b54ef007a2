"""`mexc inspect`: what a checkpoint (or a compiled output) holds."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return str(n)


def inspect_path(a) -> int:
    path = Path(a.path)
    if a.rules:
        from ..frontends.megatron.mapping import describe

        print(describe())
        return 0
    if getattr(a, "args", False):
        return print_args(path, a.iteration, a.json)
    manifest = path / "mexc-manifest.json"
    if manifest.is_file() and a.ir:
        m = json.loads(manifest.read_text())
        if m["target"] != "trtllm":
            from ..errors import UsageError

            raise UsageError(f"{path}: --ir reads TensorRT-LLM checkpoints and Megatron checkpoints, not "
                             f"{m['target']} outputs", hint="run `mexc inspect CKPT --ir` on the source instead")
        from ..frontends.trtllm import lift_trtllm

        sys.stdout.write(str(lift_trtllm(path)))
        return 0
    if manifest.is_file():
        m = json.loads(manifest.read_text())
        if a.json:
            print(json.dumps(m, indent=2))
            return 0
        print(f"mexc output ({m['target']}) of {m['source'].get('checkpoint')} "
              f"({m['source'].get('format')}, iteration {m['source'].get('iteration')})")
        print(f"model:    {m['model']['family']}, {m['model']['layers']} layers, "
              f"{m['model']['parameters'] / 1e6:.2f}M params, vocab {m['model']['vocab_size']}")
        print(f"pipeline: {m['pipeline']}")
        for f in sorted(m["files"]):
            print(f"  {f}: {len(m['files'][f])} tensors, {_human((path / f).stat().st_size)}")
        return 0
    from ..driver import lift
    from ..passes import PassManager, load_pass_file, parse_pipeline

    for f in a.load:
        load_pass_file(f)
    model = lift(path, iteration=a.iteration, config=a.config, overrides=dict(a.set))
    if a.pipeline:
        PassManager(parse_pipeline(a.pipeline))(model)
    if a.draw:
        draw(model, Path(a.draw))
        print(f"drew {a.draw}", file=sys.stderr)
    if a.ir:
        sys.stdout.write(str(model))
        return 0
    meta = model.meta
    c = model.config
    attn = next(model.graph.find("attention"), None)
    summary = {
        "path": str(path), "format": meta.get("format"), "iteration": meta.get("iteration"),
        "family": c.family, "layers": c.num_layers, "hidden_size": c.hidden_size, "vocab_size": c.vocab_size,
        "embedding_rows": next(model.graph.find("embedding")).params["word"].type.shape[0],
        "heads": attn.attrs["num_heads"] if attn else None, "kv_heads": attn.attrs["num_kv_heads"] if attn else None,
        "head_dim": attn.attrs["head_dim"] if attn else None,
        **_mla_summary(model),
        "experts": next((n.attrs["num_experts"] for n in model.graph.find("moe")), 0),
        "parallel": {"tp": meta.get("source_tp"), "pp": meta.get("source_pp"), "ep": meta.get("source_ep"),
                     "vp": meta.get("source_vp")},
        "parameters": model.param_count(), "bytes_by_dtype": model.bytes_by_dtype(),
        "unknown_args": [x for x in meta.get("unknown_args", "").split(",") if x],
    }
    summary["settings"] = settings(model)
    summary["targets"] = target_classes(
        lambda: lift(path, iteration=a.iteration, config=a.config, overrides=dict(a.set)))
    if a.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"checkpoint: {path}")
    print(f"format:     {summary['format']} (iteration {summary['iteration']})")
    print(f"arch:       {c.family}: {c.num_layers} layers, hidden {c.hidden_size}, heads {summary['heads']} "
          f"(kv {summary['kv_heads']}, head_dim {summary['head_dim']}), vocab {c.vocab_size} "
          f"(padded {summary['embedding_rows']})" + (f", {summary['experts']} experts" if summary["experts"] else ""))
    p = summary["parallel"]
    print(f"parallel:   tp={p['tp']} pp={p['pp']} ep={p['ep']} vp={p['vp']}")
    print(f"params:     {summary['parameters']:,} ({summary['parameters'] / 1e6:.2f}M)")
    print("bytes:      " + ", ".join(f"{k} {_human(v)}" for k, v in sorted(summary["bytes_by_dtype"].items())))
    for op, rows in summary["settings"].items():
        print(f"{op + ':':11s} " + "; ".join(f"{k}={v} ({where})" for k, v, where in rows))
    print("targets:    " + ", ".join(f"{t} {c}" for t, c in summary["targets"].items()))
    if summary["unknown_args"]:
        print(f"args:       {len(summary['unknown_args'])} saved argument(s) not in mexc's argument table: "
              + ", ".join(summary["unknown_args"]))
    if a.layers:
        print(f"\n{'layer':>5s}  {'op':10s} {'params':>12s}  types")
        for n in model.graph.nodes:
            if not n.params:
                continue
            numel = sum(p.type.numel for p in n.params.values())
            types = ", ".join(f"{k}:{p.type}" for k, p in n.params.items())
            print(f"{'-' if n.layer is None else n.layer:>5}  {n.op:10s} {numel:>12,}  {types}")
    return 0


def settings(model) -> dict[str, list[tuple[str, str, str]]]:
    """Per op, the attributes that differ from their declared defaults (:mod:`mexc.ir.ops`), with the layers
    that have each value: ``{"attention": [("window", "3", "layers 0, 2"), ...]}``. Sizes (attributes declared
    without a default) are left out; they are in the ``arch`` line."""
    from ..ir.ops import OPS

    found: dict[str, dict[tuple[str, str], list]] = {}
    for n in model.graph.nodes:
        schema = OPS.get(n.op)
        if schema is None:
            continue
        for k, spec in schema.attrs.items():
            v = n.attrs.get(k, spec.default)
            if spec.default is None and spec.types is int or v == spec.default or k == "rope" and v is None:
                continue
            found.setdefault(n.op, {}).setdefault((k, _short(v)), []).append(n.layer)
    out = {}
    for op, vals in found.items():
        total = sum(1 for n in model.graph.nodes if n.op == op)
        out[op] = [(k, v, "all" if len(layers) == total else "layers " + ", ".join(str(x) for x in layers))
                   for (k, v), layers in vals.items()]
    return out


def _short(v) -> str:
    """An attribute value in a few words: a Rope by its non-default fields."""
    import dataclasses

    if dataclasses.is_dataclass(v):
        default = type(v)()
        diff = {f.name: getattr(v, f.name) for f in dataclasses.fields(v) if getattr(v, f.name) != getattr(default, f.name)}
        return "{" + " ".join(f"{k}={x:g}" if isinstance(x, float) else f"{k}={x}" for k, x in diff.items()) + "}"
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def target_classes(relift) -> dict[str, str]:
    """The class each built-in target would write, or ``refused``: each target's legalization and check run on
    a fresh lift (``relift()``: lazy, no tensor is read), as ``mexc compile`` would; compile says why."""
    from ..backends.options import CompileOptions
    from ..driver import get_backend
    from ..errors import MexcError
    from ..passes import PassManager

    out = {}
    for target in ("hf", "trtllm", "onnx"):
        try:
            model, opts = relift(), CompileOptions(target=target)
            backend = get_backend(target)
            PassManager(backend.legalize(opts, model), verify_each=False)(model)
            if backend.check(model, opts):
                out[target] = "refused"
            elif target == "hf":
                from ..backends.hf.families import classify

                out[target] = classify(model)[0]
            elif target == "trtllm":
                from ..backends.trtllm import lowering_plan

                out[target] = lowering_plan(model).cls.name
            else:
                out[target] = "decoder"
        except MexcError:
            out[target] = "refused"
    return out


def print_args(path: Path, iteration: int | None, as_json: bool) -> int:
    """``mexc inspect --args``: the argument table's verdict for every argument the checkpoint saved."""
    from ..frontends.megatron.arguments import apply, describe, status
    from ..frontends.megatron.reader import open_checkpoint

    info = open_checkpoint(path, iteration)
    if not info.args:   # a checkpoint without saved args (release/ or converted): the whole table
        print(describe())
        return 0
    v = apply(info.args)
    values = {n: x for n, x, _ in v.rows}
    if as_json:
        print(json.dumps({"path": str(path), "problems": v.problems, "unknown": v.unknown,
                          "args": [{"name": n, "value": repr(x), "verdict": r.verdict if r else "unknown",
                                    "status": status(r, x, values),
                                    "by": r.by if r else "", "fix": r.fix if r else "",
                                    "versions": r.versions if r else ""} for n, x, r in v.rows]}, indent=2))
        return 0
    print(describe(info.args))
    counts: dict[str, int] = {}
    for _, x, r in v.rows:
        k = status(r, x, values)
        counts[k] = counts.get(k, 0) + 1
    print(f"\n{len(v.rows)} saved arguments: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
          + (f"\nrefused: {'; '.join(v.problems)}" if v.problems else "; nothing refused"))
    return 0


def _mla_summary(model) -> dict:
    """Heads and sizes of a multi-latent attention model (its KV heads are its heads; the head dim is q/k's)."""
    n = next(model.graph.find("mla"), None)
    if n is None:
        return {}
    a = n.attrs
    q_down = n.params.get("q_down")
    return {"heads": a["num_heads"], "kv_heads": a["num_heads"], "head_dim": a["qk_head_dim"] + a["qk_rope_dim"],
            "mla": {"q_lora_rank": q_down.type.shape[0] if q_down is not None else None,
                    "kv_lora_rank": a["kv_lora_rank"], "qk_head_dim": a["qk_head_dim"],
                    "qk_rope_dim": a["qk_rope_dim"], "v_head_dim": a["v_head_dim"]}}


def draw(model, path: Path) -> None:
    """Draw the layer graph: ``.dot`` (Graphviz source) and ``.svg`` natively; other formats through Graphviz."""
    import shutil
    import subprocess

    g = model.graph.to_networkx()
    if path.suffix == ".svg":
        path.write_text(_svg(g))
        return
    lines = ["digraph mexc {", "  rankdir=TB; node [shape=box, style=rounded, fontname=Helvetica];"]
    for i, d in g.nodes(data=True):
        lines.append(f'  n{i} [label="{d["label"]}\\nstage {d["stage"]}"];')
    for u, v in g.edges():
        lines.append(f"  n{u} -> n{v};")
    lines.append("}")
    dot = "\n".join(lines) + "\n"
    if path.suffix == ".dot":
        path.write_text(dot)
        return
    exe = shutil.which("dot")
    if exe is None:
        from ..errors import UsageError

        raise UsageError(f"drawing {path.suffix} needs Graphviz's `dot` program",
                         hint="use --draw FILE.svg or FILE.dot, or install graphviz (apt install graphviz)")
    subprocess.run([exe, f"-T{path.suffix[1:]}", "-o", str(path)], input=dot, text=True, check=True)


_COLORS = {"embedding": "#dbeafe", "norm": "#f3f4f6", "attention": "#fde68a", "mlp": "#bbf7d0", "moe": "#a7f3d0",
           "add": "#ffffff", "lm_head": "#fecaca"}


def _svg(g) -> str:
    """Nodes in program order down a column; data edges straight, skip (residual) edges as arcs on the right."""
    from html import escape

    W, H, GAP, X = 220, 30, 14, 40
    n = g.number_of_nodes()
    y = {i: 20 + i * (H + GAP) for i in g.nodes}
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W + 2 * X + 160}" height="{40 + n * (H + GAP)}" '
             'font-family="Helvetica, Arial, sans-serif" font-size="12">',
             '<defs><marker id="a" markerWidth="8" markerHeight="8" refX="7" refY="4" orient="auto">'
             '<path d="M0,0 L8,4 L0,8 z" fill="#555"/></marker></defs>']
    for u, v in g.edges():
        x0 = X + W // 2
        if v == u + 1:
            parts.append(f'<line x1="{x0}" y1="{y[u] + H}" x2="{x0}" y2="{y[v]}" stroke="#555" marker-end="url(#a)"/>')
        else:
            bend = X + W + 20 + 12 * min(v - u, 10)
            parts.append(f'<path d="M{X + W},{y[u] + H // 2} C{bend},{y[u] + H // 2} {bend},{y[v] + H // 2} '
                         f'{X + W},{y[v] + H // 2}" fill="none" stroke="#999" marker-end="url(#a)"/>')
    for i, d in g.nodes(data=True):
        op = d["op"]
        tip = escape("; ".join(f"{k}: {t}" for k, t in d["params"].items()))
        parts.append(f'<g><title>{tip}</title><rect x="{X}" y="{y[i]}" width="{W}" height="{H}" rx="6" '
                     f'fill="{_COLORS.get(op, "#eee")}" stroke="#333"/>'
                     f'<text x="{X + W // 2}" y="{y[i] + 19}" text-anchor="middle">{escape(d["label"])} '
                     f'(stage {d["stage"]})</text></g>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
