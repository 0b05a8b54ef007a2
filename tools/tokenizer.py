"""``mexc tokenizer OUT --from PATH``: add (or, with ``--force``, replace) the tokenizer of a compiled output.

Writes the HF tokenizer files (:mod:`mexc.frontends.tokenizer`) into ``OUT`` and puts the tokenizer's
bos/eos/pad ids (``--set`` overrides them) into the files the output's runtime reads them from:
``config.json`` + ``generation_config.json`` (hf), ``genai_config.json`` (onnx, ort profile). The manifest
records where the tokenizer came from. Every file is replaced by an atomic rename, never edited in place.
Errors: UsageError (not a mexc output, tokenizer already there), ConfigError (tokenizer unreadable, too big).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from ..errors import UsageError
from ..frontends import tokenizer as tokenizers
from .run import MANIFEST, has_tokenizer, read_manifest


def _vocab_rows(out: Path, target: str) -> int:
    """The logit rows of the output (its config's vocab_size)."""
    if target == "onnx" and (out / "genai_config.json").is_file():
        return int(json.loads((out / "genai_config.json").read_text())["model"]["vocab_size"])
    cfg = json.loads((out / "config.json").read_text()) if (out / "config.json").is_file() else {}
    rows = cfg.get("vocab_size") or cfg.get("pretrained_config", {}).get("vocab_size")
    if rows is None:
        m = json.loads((out / MANIFEST).read_text())
        rows = m.get("model", {}).get("vocab_size")
    return int(rows)


def _replace_json(path: Path, data: dict, indent: int = 2) -> None:
    from ..backends.output import write_new

    tmp = path.with_name(f".{path.name}.mexc-new")
    tmp.unlink(missing_ok=True)
    write_new(tmp, json.dumps(data, indent=indent, sort_keys=path.name == MANIFEST) + "\n")
    os.replace(tmp, path)


def set_ids(out: Path, target: str, ids: dict) -> list[str]:
    """Write ``ids`` into the output's config files (unknown ids removed); returns the files changed."""
    changed = []
    plain = {k: (list(v) if isinstance(v, tuple) else v) for k, v in ids.items()}
    if target == "hf":
        for name in ("config.json", "generation_config.json"):
            path = out / name
            data = json.loads(path.read_text()) if path.is_file() else {}
            for k in tokenizers.TOKEN_FIELDS:
                if k in plain:
                    data[k] = plain[k]
                elif name == "config.json":
                    data[k] = None
                else:
                    data.pop(k, None)
            _replace_json(path, data)
            changed.append(name)
    elif target == "onnx" and (out / "genai_config.json").is_file():
        path = out / "genai_config.json"
        data = json.loads(path.read_text())
        model = data["model"]
        for k in tokenizers.TOKEN_FIELDS:
            model.pop(k, None)
        eos = plain.get("eos_token_id")
        model.update({k: v for k, v in plain.items()})
        if "pad_token_id" not in plain and eos is not None:
            model["pad_token_id"] = eos[0] if isinstance(eos, list) else eos
        _replace_json(path, data, indent=4)
        changed.append(path.name)
    return changed


def add_tokenizer(a) -> int:
    out = Path(a.out)
    manifest = read_manifest(out)
    target = str(manifest.get("target"))
    unknown = sorted(set(dict(a.set)) - set(tokenizers.TOKEN_FIELDS))
    if unknown:
        raise UsageError(f"--set {unknown[0]}: only token ids can be set here",
                         hint=f"one of {', '.join(tokenizers.TOKEN_FIELDS)}; recompile to change the architecture")
    if has_tokenizer(out) and not a.force:
        raise UsageError(f"{out}: already has a tokenizer (tokenizer.json / tokenizer_config.json)",
                         hint="add --force to replace it")
    found = tokenizers.from_path(a.source, origin="--from")
    res = tokenizers.Resolved(tokenizers.load(found), found)
    rows = _vocab_rows(out, target)
    tokenizers.check_vocab(res.tok, rows, str(a.source))
    ids = tokenizers.token_ids(res, dict(a.set), rows)
    files = tokenizers.write(res.tok, out, replace=a.force)
    changed = set_ids(out, target, ids)
    manifest.update(res.manifest())
    _replace_json(out / MANIFEST, manifest)
    shown = ", ".join(f"{k}={v}" for k, v in ids.items()) or "no special ids"
    print(f"wrote {', '.join(files)} to {out} ({len(res.tok)} tokens, {shown}"
          + (f"; updated {', '.join(changed)}" if changed else "") + ")", file=sys.stderr)
    return 0
