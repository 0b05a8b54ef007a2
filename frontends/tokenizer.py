"""The tokenizer a compiled model is served with: found, converted to Hugging Face files, its special ids read.

Where it comes from, first match wins:

* ``--tokenizer PATH`` (``mexc compile`` / ``mexc tokenizer OUT --from PATH``): an HF tokenizer directory
  (``tokenizer.json`` / ``tokenizer_config.json``), a SentencePiece model (``*.model``, or a directory holding
  ``tokenizer.model``), GPT-2 BPE files (``vocab.json`` + ``merges.txt``: a directory holding both, the
  ``vocab.json`` with ``merges.txt`` beside it, or ``VOCAB.json,MERGES.txt``), a tiktoken BPE file
  (``*.tiktoken``: base64 token and rank per line), or a lone ``tokenizer.json``;
* the files the checkpoint's saved args name (Megatron-LM's ``--tokenizer-type`` with ``--tokenizer-model``,
  ``--vocab-file`` and ``--merge-file``; see megatron/training/tokenizer/tokenizer.py) when they exist here.

Conversion is transformers' own (``LlamaTokenizer`` / ``GPT2Tokenizer`` from the original files, its
``TikTokenConverter``); a converted SentencePiece tokenizer is checked against ``sentencepiece`` on sample
text before it is written. The result is written with ``save_pretrained`` (``tokenizer.json``,
``tokenizer_config.json``, special tokens, a chat template when there is one): what ``transformers``, vLLM,
TensorRT-LLM (``--tokenizer`` / ``--tokenizer_dir``) and onnxruntime-genai (``og.Tokenizer``) read.

Errors: :class:`~mexc.errors.ConfigError` naming the path and what to pass instead.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError

TOKEN_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")
SAMPLES = ("Hello world! This is a test.", "  two  spaces, tabs\tand\nnew lines 1234567890",
           "naïve café, Größe, 東京, emoji 🙂")
_HF_FILES = ("tokenizer.json", "tokenizer_config.json")
# Megatron-LM --tokenizer-type values and the args that name their files
_SPM_TYPES = ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer", "Llama3Tokenizer",
              "MistralTokenizer")
# what save_pretrained writes, in transformers 4.x and 5.x (a replaced tokenizer leaves none of them behind)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt",
                   "vocab.txt")
FIX = "pass it with --tokenizer PATH, or add it later with `mexc tokenizer OUT --from PATH`"


@dataclass
class Found:
    """A tokenizer source: ``kind`` (hf | sentencepiece | gpt2 | tiktoken), its files, where it was named."""

    kind: str
    paths: tuple[Path, ...]
    origin: str                                  # "--tokenizer" or "checkpoint args (tokenizer_model=...)"


def megatron_args(args: Any) -> dict[str, Any]:
    """The tokenizer fields of Megatron's saved args (an argparse.Namespace or a dict); absent ones omitted."""
    get = args.get if isinstance(args, dict) else (lambda k, d=None: getattr(args, k, d))
    keys = ("tokenizer_type", "tokenizer_model", "vocab_file", "merge_file", "tiktoken_pattern",
            "tiktoken_num_special_tokens", "vocab_size")
    return {k: get(k) for k in keys if args is not None and get(k) is not None}


def _describe(a: dict) -> str:
    return ", ".join(f"{k}={a[k]}" for k in ("tokenizer_type", "tokenizer_model", "vocab_file", "merge_file")
                     if k in a) or "no tokenizer args"


def from_path(path: str | Path, origin: str = "--tokenizer") -> Found:
    """Classify a user path (see the module doc); raises ConfigError when it is none of the known forms."""
    text = str(path)
    if "," in text:
        vocab, merges = (Path(q) for q in text.split(",", 1))
        for q in (vocab, merges):
            if not q.is_file():
                raise ConfigError(f"{q}: no such file (from {origin} {text})", hint="give VOCAB.json,MERGES.txt")
        return Found("gpt2", (vocab, merges), origin)
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{p}: no such file or directory (from {origin})",
                          hint=FIX if origin != "--from" else "give --from the tokenizer's path: an HF tokenizer "
                          "directory, a SentencePiece .model, vocab.json,merges.txt or a .tiktoken file")
    if p.is_dir():
        if any((p / f).is_file() for f in _HF_FILES):
            return Found("hf", (p,), origin)
        if (p / "tokenizer.model").is_file():
            return Found("sentencepiece", (p / "tokenizer.model",), origin)
        if (p / "vocab.json").is_file() and (p / "merges.txt").is_file():
            return Found("gpt2", (p / "vocab.json", p / "merges.txt"), origin)
        tik = sorted(p.glob("*.tiktoken"))
        if len(tik) == 1:
            return Found("tiktoken", (tik[0],), origin)
        raise ConfigError(f"{p}: holds no tokenizer mexc can read (tokenizer.json, tokenizer_config.json, "
                          "tokenizer.model, vocab.json + merges.txt or one *.tiktoken)",
                          hint="give the directory of an HF tokenizer, or the tokenizer file itself")
    name = p.name.lower()
    if name == "tokenizer.json":
        return Found("hf", (p,), origin)
    if name.endswith(".tiktoken"):
        return Found("tiktoken", (p,), origin)
    if name.endswith(".json"):
        beside = [m for m in (p.parent / "merges.txt", p.with_name(p.stem.replace("vocab", "merges") + ".txt"))
                  if m.is_file()]
        if not beside:
            raise ConfigError(f"{p}: a GPT-2 vocab needs its merges file (merges.txt beside it)",
                              hint=f"pass --tokenizer {p},MERGES.txt")
        return Found("gpt2", (p, beside[0]), origin)
    with open(p, "rb") as f:
        head = f.read(64)
    if p.suffix == ".model" or head[:1] == b"\n":   # a SentencePiece ModelProto starts with field 1 (pieces)
        return Found("sentencepiece", (p,), origin)
    raise ConfigError(f"{p}: not a tokenizer file mexc knows (*.model, vocab.json, *.tiktoken, tokenizer.json)",
                      hint="give an HF tokenizer directory (save_pretrained) instead")


def from_args(args: Any) -> tuple[Found | None, str | None]:
    """The tokenizer the checkpoint's args name, when its files exist here; else ``(None, why)``."""
    a = megatron_args(args)
    ttype = a.get("tokenizer_type")
    origin = f"checkpoint args ({_describe(a)})"
    if args is None:
        return None, "the checkpoint has no saved args, so no tokenizer is named"
    if ttype in (None, "NullTokenizer"):
        return None, f"the checkpoint was trained with {ttype or 'no tokenizer_type'} (token ids only)"
    if ttype == "GPT2BPETokenizer":
        files = [str(a.get("vocab_file") or ""), str(a.get("merge_file") or "")]
        if all(files) and all(Path(f).is_file() for f in files):
            return Found("gpt2", (Path(files[0]), Path(files[1])), origin), None   # eod = bos = eos <|endoftext|>
        return None, f"its args name {_describe(a)}, not found on this machine"
    if ttype == "TikTokenizer":
        return None, (f"its args name {_describe(a)}: Megatron's TikTokenizer puts "
                      f"{a.get('tiktoken_num_special_tokens', 1000)} special tokens before the BPE ranks, which "
                      "mexc does not convert; save it as an HF tokenizer")
    model = a.get("tokenizer_model")
    if ttype in (*_SPM_TYPES, "HuggingFaceTokenizer") and model:
        if Path(model).exists():
            return from_path(model, origin), None
        return None, f"its args name {_describe(a)}, not found on this machine"
    return None, f"its args name {_describe(a)}, which mexc does not convert"


def load(found: Found):
    """The tokenizer as a transformers fast tokenizer (offline; files only)."""
    try:
        import transformers
    except ImportError:
        raise ConfigError("writing a tokenizer needs transformers", hint="pip install 'mexc[hf]'") from None
    p = found.paths[0]
    try:
        if found.kind == "hf":
            if p.is_file():
                return transformers.PreTrainedTokenizerFast(tokenizer_file=str(p))
            return transformers.AutoTokenizer.from_pretrained(str(p), local_files_only=True)
        if found.kind == "gpt2":   # transformers 5 takes vocab=/merges=; 4.x's fast class vocab_file=/merges_file=
            if int(transformers.__version__.split(".")[0]) >= 5:
                return transformers.GPT2Tokenizer(vocab=str(p), merges=str(found.paths[1]))
            fast = getattr(transformers, "GPT2TokenizerFast")
            return fast(vocab_file=str(p), merges_file=str(found.paths[1]))
        if found.kind == "sentencepiece":
            return _sentencepiece(p)
        from transformers.convert_slow_tokenizer import TikTokenConverter

        obj = TikTokenConverter(vocab_file=str(p)).converted()
        return transformers.PreTrainedTokenizerFast(tokenizer_object=obj)
    except ConfigError:
        raise
    except Exception as e:   # tokenizers / sentencepiece raise plain Exception / RuntimeError on bad files
        raise ConfigError(f"{p}: cannot read the {found.kind} tokenizer ({found.origin}): "
                          f"{str(e).splitlines()[0] if str(e) else type(e).__name__}",
                          hint="check the file, or give an HF tokenizer directory with --tokenizer") from None


def _sentencepiece(path: Path):
    """A fast tokenizer converted from the .model by transformers, checked against sentencepiece on
    :data:`SAMPLES`; special tokens as the model defines them."""
    try:
        import sentencepiece as spm
    except ImportError:
        raise ConfigError(f"{path}: reading a SentencePiece model needs the sentencepiece package",
                          hint="pip install sentencepiece") from None
    import transformers

    sp = spm.SentencePieceProcessor(model_file=str(path))
    special: dict = {}
    for name, i in (("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()), ("unk_token", sp.unk_id()),
                    ("pad_token", sp.pad_id())):
        special[name] = sp.id_to_piece(i) if i >= 0 else None
    # transformers' generic SentencePiece conversion follows the model's own normalizer spec; Llama's assumes
    # Llama's settings. The first that encodes the samples exactly as sentencepiece does is taken.
    classes = [c for c in (getattr(transformers, "TokenizersBackend", None), transformers.LlamaTokenizerFast) if c]
    bad = ""
    for cls in classes:
        with tempfile.TemporaryDirectory() as d:
            os.symlink(path.resolve(), Path(d) / "tokenizer.model")
            tok = cls.from_pretrained(d, local_files_only=True, **special)
        diff = [s for s in SAMPLES if tok.encode(s, add_special_tokens=False) != sp.encode(s)]
        if not diff:
            return tok
        bad = bad or diff[0]
    raise ConfigError(f"{path}: transformers' conversion of this SentencePiece model encodes {bad!r} differently "
                      "from sentencepiece", hint="convert it yourself and pass the HF directory with --tokenizer")


def special_ids(tok) -> dict[str, int]:
    """bos/eos/pad ids the tokenizer defines (None ones left out); pad falls back to nothing, not to 0."""
    out = {}
    for f in TOKEN_FIELDS:
        v = getattr(tok, f, None)
        if isinstance(v, int) and v >= 0:
            out[f] = v
    return out


def check_vocab(tok, rows: int, where: str) -> None:
    """A tokenizer with more ids than the model's embedding rows cannot drive it."""
    n = len(tok)
    if n > rows:
        raise ConfigError(f"{where}: the tokenizer has {n} tokens, the model's embedding only {rows} rows",
                          hint="this is not the tokenizer the model was trained with")


def save_files(tok) -> dict[str, bytes]:
    """The files ``tok.save_pretrained`` writes, by name (read back into memory: a few MB at most)."""
    with tempfile.TemporaryDirectory() as d:
        tok.save_pretrained(d)
        return {f.name: f.read_bytes() for f in sorted(Path(d).iterdir()) if f.is_file()}


def write(tok, out: Path, *, replace: bool = False) -> dict[str, int]:
    """Write the tokenizer files into ``out``; returns ``{name: bytes}``.

    New files are created with O_EXCL (mexc's :func:`write_new`); ``replace`` (``mexc tokenizer --force``)
    swaps earlier tokenizer files in with an atomic rename. Names mexc writes itself are never overwritten."""
    from ..backends.output import write_new

    files = save_files(tok)
    taken = {"config.json", "generation_config.json", "genai_config.json", "mexc-manifest.json"} & set(files)
    if taken:
        raise ConfigError(f"saving the tokenizer would overwrite {sorted(taken)} in {out}",
                          hint="give a tokenizer directory without model files")
    if replace:   # an earlier tokenizer's files the new one does not have would be read with the new ones
        for name in sorted(set(TOKENIZER_FILES) - set(files)):
            if (out / name).is_file() and not (out / name).is_symlink():
                (out / name).unlink()
    for name, data in files.items():
        dst = out / name
        if replace:
            tmp = out / f".{name}.mexc-new"
            tmp.unlink(missing_ok=True)
            write_new(tmp, data)
            os.replace(tmp, dst)
        else:
            write_new(dst, data)
    return {n: len(d) for n, d in files.items()}


def missing_note(why: str) -> str:
    """The one note a compile without a tokenizer prints."""
    return (f"no tokenizer written: {why}; config files carry no bos/eos/pad ids (null, not 0). "
            f"Add one later with `mexc tokenizer OUT --from PATH` (an HF tokenizer dir, a SentencePiece .model, "
            "GPT-2 vocab.json,merges.txt or a .tiktoken file), or pass --tokenizer PATH to compile")


@dataclass
class Resolved:
    """What a compile carries: the loaded tokenizer (or None), where it came from, the note when absent."""

    tok: Any = None
    found: Found | None = None
    why_missing: str | None = None

    def manifest(self) -> dict:
        if self.tok is None or self.found is None:
            return {"tokenizer": None}
        return {"tokenizer": {"kind": self.found.kind, "origin": self.found.origin,
                              "files": [str(p) for p in self.found.paths], "size": len(self.tok)}}


def resolve(ckpt: str | Path, path: str | Path | None, iteration: int | None = None) -> Resolved:
    """``--tokenizer PATH`` when given, else the files the checkpoint's args name (read from its saved args)."""
    if path is not None:
        given = from_path(path)
        return Resolved(load(given), given)
    from .megatron.reader import open_checkpoint

    found, why = from_args(open_checkpoint(ckpt, iteration).args)
    if found is None:
        return Resolved(why_missing=why)
    return Resolved(load(found), found)


def split_overrides(overrides: dict | None) -> tuple[dict, dict]:
    """``--set`` fields: (architecture fields, token-id fields) - the ids never reach the frontend."""
    arch = dict(overrides or {})
    ids = {k: arch.pop(k) for k in TOKEN_FIELDS if k in arch}
    return arch, ids


def token_ids(res: Resolved, overrides: dict, rows: int) -> dict[str, Any]:
    """bos/eos/pad ids from the tokenizer, then ``--set`` overrides; each checked against ``rows``."""
    ids: dict[str, Any] = dict(special_ids(res.tok)) if res.tok is not None else {}
    for k, v in overrides.items():
        vals = v if isinstance(v, (list, tuple)) else [v]
        if v is None:
            ids.pop(k, None)
            continue
        if not vals or not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < rows for x in vals):
            raise ConfigError(f"--set {k}={v}: a token id must be an integer in [0, {rows})",
                              hint=f"e.g. --set {k}=2 (or a list for eos: --set eos_token_id=[2,3])")
        ids[k] = tuple(vals) if isinstance(v, (list, tuple)) else v
    return ids


def attach(model, res: Resolved, id_overrides: dict) -> None:
    """Check the tokenizer against the lifted model and put the ids into ``model.config.extra`` (the backends
    read ``bos_token_id`` / ``eos_token_id`` / ``pad_token_id`` from there)."""
    import dataclasses

    emb = next(iter(model.graph.find("embedding")), None)
    rows = emb.params["word"].type.shape[0] if emb is not None else model.config.vocab_size
    if res.tok is not None:
        check_vocab(res.tok, rows, res.found.origin if res.found else "the tokenizer")
    ids = token_ids(res, id_overrides, rows)
    extra = {k: v for k, v in dict(model.config.extra).items() if k not in TOKEN_FIELDS}
    extra.update(ids)
    model.config = dataclasses.replace(model.config, extra=tuple(sorted(extra.items())))


def default_vocab(model, res: Resolved) -> tuple[int | None, str | None]:
    """``--vocab-size`` when the user gave none: the tokenizer's size (or the saved unpadded vocab when larger);
    without a tokenizer, the saved unpadded vocab (Megatron's ``vocab_size``, + 1 for NullTokenizer's eod id).
    Every target then drops Megatron's padding rows alike (issue 19 item 7). Returns (size, note); (None, None)
    when there is nothing to trim."""
    emb = next(iter(model.graph.find("embedding")), None)
    rows = emb.params["word"].type.shape[0] if emb is not None else model.config.vocab_size
    saved = model.config.vocab_size   # the unpadded vocab when the args had one; else the padded rows
    if res.tok is None:
        if saved >= rows:
            return None, None
        return saved, (f"vocab {rows} -> {saved}: trimmed Megatron's padding rows to the {saved} ids of the saved "
                       f"args (no tokenizer; --vocab-size {rows} keeps them)")
    size = len(res.tok) if saved >= rows else max(len(res.tok), saved)
    if size >= rows:
        return None, None
    basis = f"the tokenizer's {len(res.tok)} tokens" if size == len(res.tok) else \
        f"the {size} ids of the saved args (the tokenizer has {len(res.tok)})"
    return size, (f"vocab {rows} -> {size}: trimmed Megatron's padding rows to {basis} (--vocab-size {rows} keeps "
                  "them)")
