"""The files of a NeMo / Megatron-Bridge checkpoint other than its weights: config YAML read safely and bounded,
OmegaConf leftovers, saved references (``_target_``), the torch_dist backend check, the tokenizer the wrapper saved,
and a checkpoint directory addressed like a ``.nemo`` archive (:class:`DirTree`, :class:`.nemo_archive.TarTree`).
Used by :mod:`.wrappers`."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from ...errors import CheckpointError, ConfigError
from .reader import inside

MAX_CONFIG_BYTES = 16 << 20      # a model.yaml / run_config.yaml is kilobytes
MAX_CONFIG_NODES = 1 << 20      # YAML nodes visited, aliases followed (a real run_config.yaml has a few thousand)


def bridge_tokenizer(tok: Any, assets: Path) -> dict:
    """Megatron-LM tokenizer args (what :mod:`mexc.frontends.tokenizer` reads) from run_config.yaml's
    ``tokenizer:`` section (Megatron-LM's names); a file it names that is not on this machine is taken from the
    copy Megatron-Bridge saved beside the weights (``iter_N/tokenizer/``, its ``save_tokenizer_assets``)."""
    if not isinstance(tok, dict):
        return {}
    out = {k: tok[k] for k in ("tokenizer_type", "tokenizer_model", "vocab_file", "merge_file")
           if isinstance(tok.get(k), str)}
    for k in ("tokenizer_model", "vocab_file", "merge_file"):
        if k in out and not Path(out[k]).exists():
            hf = k == "tokenizer_model" and out.get("tokenizer_type") == "HuggingFaceTokenizer"
            local = assets if hf else assets / PurePosixPath(out[k]).name
            if local.exists():
                out[k] = str(local)
    return out


def nemo2_tokenizer(tok: Any, context: Path) -> dict:
    """Megatron-LM tokenizer args from model.yaml's ``tokenizer:`` (NeMo's ``AutoTokenizer`` /
    ``SentencePieceTokenizer``) when it names files NeMo saved inside ``context/`` (``nemo_tokenizer/``)."""
    if not isinstance(tok, dict):
        return {}
    target = str(tok.get("_target_", ""))
    name, ttype = ((tok.get("pretrained_model_name"), "HuggingFaceTokenizer") if target.endswith(".AutoTokenizer")
                   else (tok.get("model_path"), "SentencePieceTokenizer")
                   if target.endswith(".SentencePieceTokenizer") else (None, None))
    if not isinstance(name, str) or not name or Path(name).is_absolute():
        return {}
    p = (context / name).resolve()
    if os.path.commonpath([p, context.resolve()]) != str(context.resolve()) or not p.exists():
        return {}
    return {"tokenizer_type": ttype, "tokenizer_model": str(p)}


# ------------------------------------------------------------------------------------------ config files


def load_yaml(text: bytes, where: str) -> Any:
    """``yaml.safe_load`` (no tags, nothing imported), then a bound on the nodes reachable through aliases: an
    alias bomb loads as shared references but would explode when walked or printed."""
    try:
        doc = yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"{where}: not valid YAML ({first[:120]})", hint="copy the checkpoint again") from None
    todo, seen = [doc], 0
    while todo:
        v = todo.pop()
        seen += 1
        if seen > MAX_CONFIG_NODES:
            raise ConfigError(f"{where}: more than {MAX_CONFIG_NODES} YAML nodes (aliases expanded); not a config "
                              "file a training run writes", hint="copy the checkpoint's config file again")
        if isinstance(v, dict):
            todo.extend(v.keys())
            todo.extend(v.values())
        elif isinstance(v, list):
            todo.extend(v)
    return doc


def read_file(path: Path, limit: int) -> bytes:
    with open(inside(path.parent, path), "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise CheckpointError(f"{path}: larger than {limit} bytes; not a config file", hint="copy the right file")
    return data


def check_backend(text: bytes, where: str) -> None:
    try:
        backend = json.loads(text).get("sharded_backend")
    except (ValueError, AttributeError):
        raise CheckpointError(f"{where}: not a megatron-core metadata.json", hint="copy the checkpoint again") from None
    if backend != "torch_dist":
        raise CheckpointError(f"{where}: sharded_backend {backend!r}; mexc reads torch_dist",
                              hint="convert it to torch_dist (megatron-core's dist_checkpointing) first")


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")        # YAML 1.1 reads 1e-5 as a string
_INTERP = re.compile(r"\$\{(?:\.|model\.)?([A-Za-z_]\w*)\}")   # OmegaConf ${.key} / ${model.key} / ${key}


def plain(cfg: dict) -> dict:
    """A config mapping as the training run saw it: OmegaConf references to a sibling key (NeMo 1 saves
    ``max_position_embeddings: ${.encoder_seq_length}``) resolved, exponent-only floats (``1e-5``) as numbers. Other
    interpolations stay strings (and are refused where they matter)."""
    out = dict(cfg)
    for k, v in cfg.items():
        for _ in range(8):  # a chain of references, never a cycle
            m = _INTERP.fullmatch(v) if isinstance(v, str) else None
            if m is None or m.group(1) not in cfg:
                break
            v = cfg[m.group(1)]
        out[k] = float(v) if isinstance(v, str) and _FLOAT.fullmatch(v) else v
    return out


def ref(v: Any) -> Any:
    """A saved ``{_target_: X, _call_: false}`` reference -> ``"X"``; an enum ``{_target_, _name_}`` -> its name;
    anything else as is."""
    if isinstance(v, dict) and "_target_" in v:
        if "_name_" in v:
            return str(v["_name_"])
        if not v.get("_call_", True) or set(v) <= {"_target_", "_call_"}:
            return str(v["_target_"])
    return v


class DirTree:
    """A checkpoint directory, addressed by relative names."""

    def __init__(self, root: Path):
        self.root = root

    def label(self, rel: str) -> str:
        return str(self.root / rel) if rel else str(self.root)

    def is_file(self, rel: str) -> bool:
        return (self.root / rel).is_file()

    def is_dir(self, rel: str) -> bool:
        return (self.root / rel).is_dir()

    def read(self, rel: str, limit: int) -> bytes:
        return read_file(self.root / rel, limit)
