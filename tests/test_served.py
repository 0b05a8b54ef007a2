"""From checkpoint to a served model (issue 19): the tokenizer carried into every output, its ids in the config
files, `mexc tokenizer`, `mexc run` (transformers and onnxruntime-genai agree token for token), chat templates,
--version. The command side (serve commands, TensorRT detection, layout errors, refused options) is in
test_served_commands.py.

Oracles: transformers' tokenizer and model, onnxruntime-genai's tokenizer and generator, sentencepiece and
tiktoken for the converted tokenizers."""

from __future__ import annotations

import argparse
import base64
import json
import shutil
from pathlib import Path

import pytest

from mexc.frontends import tokenizer as tokenizers
from mexc.tools.cli import main

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "llama-tiny"
TOKENIZER = ROOT / "examples" / "llama-tiny-tokenizer"
PROMPT = "the quick brown"


def _mexc(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The example compiled to hf and onnx with its tokenizer (one compile per target for the module)."""
    base = tmp_path_factory.mktemp("served")
    outs = {}
    for target in ("hf", "onnx"):
        out = base / target
        assert main(["compile", str(EXAMPLE), "--target", target, "--tokenizer", str(TOKENIZER), "-o", str(out),
                     "--quiet"]) == 0
        outs[target] = out
    return outs


def test_tokenizer_files_and_ids(served):
    transformers = pytest.importorskip("transformers")
    want = transformers.AutoTokenizer.from_pretrained(str(TOKENIZER))
    assert (want.bos_token_id, want.eos_token_id) == (1, 2)
    for out in served.values():
        tok = transformers.AutoTokenizer.from_pretrained(str(out))
        assert tok.encode(PROMPT) == want.encode(PROMPT) and len(tok) == len(want) == 100
        m = json.loads((out / "mexc-manifest.json").read_text())
        assert m["tokenizer"]["kind"] == "hf" and m["tokenizer"]["size"] == 100
    cfg = json.loads((served["hf"] / "config.json").read_text())
    gen = json.loads((served["hf"] / "generation_config.json").read_text())
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, None)
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (1, 2) and "pad_token_id" not in gen
    # the example was saved with NullTokenizer --vocab-size 100, i.e. 101 ids (its eod is id 100): the larger of
    # that and the tokenizer's 100; Megatron's 27 padding rows trimmed, as onnx does
    assert cfg["vocab_size"] == 101
    genai = json.loads((served["onnx"] / "genai_config.json").read_text())["model"]
    assert (genai["bos_token_id"], genai["eos_token_id"], genai["pad_token_id"], genai["vocab_size"]) == (1, 2, 2, 101)


def test_onnxruntime_genai_tokenizer_reads_the_output(served):
    og = pytest.importorskip("onnxruntime_genai")
    transformers = pytest.importorskip("transformers")
    tok = og.Tokenizer(og.Model(str(served["onnx"])))
    want = transformers.AutoTokenizer.from_pretrained(str(TOKENIZER))
    ids = [int(i) for i in tok.encode("hello world from megatron")]
    assert ids == want.encode("hello world from megatron", add_special_tokens=False)
    assert tok.decode(ids) == "hello world from megatron"


def test_run_hf_and_onnx_agree(served, capsys):
    """Greedy generation through transformers and through onnxruntime-genai: the same ids, the same text."""
    pytest.importorskip("onnxruntime_genai")
    transformers = pytest.importorskip("transformers")
    got = {}
    for target, out in served.items():
        rc, stdout, _ = _mexc(capsys, "run", out, "--prompt", PROMPT, "--max-new-tokens", 12, "--json")
        assert rc == 0
        got[target] = json.loads(stdout)
    hf, onnx = got["hf"], got["onnx"]
    assert hf["runtime"].startswith("transformers") and onnx["runtime"].startswith("onnxruntime-genai")
    assert hf["prompt_ids"] == onnx["prompt_ids"] == transformers.AutoTokenizer.from_pretrained(
        str(TOKENIZER)).encode(PROMPT)
    assert hf["new_ids"] == onnx["new_ids"] and 0 < len(hf["new_ids"]) <= 12
    assert all(i < 100 for i in hf["new_ids"])
    assert hf["text"] == onnx["text"] and hf["text"].strip()
    rc, stdout, _ = _mexc(capsys, "run", served["hf"], "--prompt", PROMPT, "--max-new-tokens", 12)
    assert rc == 0 and stdout.strip() == (PROMPT + hf["text"]).strip()


def test_without_tokenizer_then_mexc_tokenizer(tmp_path, capsys):
    og = pytest.importorskip("onnxruntime_genai")
    out = tmp_path / "onnx"
    rc, _, err = _mexc(capsys, "compile", EXAMPLE, "--target", "onnx", "-o", out)
    assert rc == 0
    notes = [line for line in err.splitlines() if line.startswith("note: no tokenizer")]
    assert len(notes) == 1 and "NullTokenizer" in notes[0] and "mexc tokenizer OUT --from PATH" in notes[0]
    genai = json.loads((out / "genai_config.json").read_text())["model"]
    assert not {"bos_token_id", "eos_token_id", "pad_token_id"} & set(genai)   # unknown: absent, not 0
    assert not (out / "tokenizer.json").exists()
    rc, _, err = _mexc(capsys, "run", out, "--prompt", PROMPT)
    assert rc == 1 and "no tokenizer files" in err and f"mexc tokenizer {out} --from PATH" in err
    # onnxruntime-genai runs the output from ids without the special ids
    params = og.GeneratorParams(og.Model(str(out)))
    params.set_search_options(do_sample=False, max_length=8)
    rc, _, err = _mexc(capsys, "tokenizer", out, "--from", TOKENIZER)
    assert rc == 0, err
    genai = json.loads((out / "genai_config.json").read_text())["model"]
    assert (genai["bos_token_id"], genai["eos_token_id"], genai["pad_token_id"]) == (1, 2, 2)
    assert json.loads((out / "mexc-manifest.json").read_text())["tokenizer"]["size"] == 100
    rc, stdout, _ = _mexc(capsys, "run", out, "--prompt", PROMPT, "--json")
    assert rc == 0 and json.loads(stdout)["prompt_ids"][:1] == [31]
    rc, _, err = _mexc(capsys, "tokenizer", out, "--from", TOKENIZER)
    assert rc == 2 and "already has a tokenizer" in err and "--force" in err
    rc, _, err = _mexc(capsys, "tokenizer", out, "--from", TOKENIZER, "--force", "--set", "eos_token_id=[2,3]")
    assert rc == 0, err
    genai = json.loads((out / "genai_config.json").read_text())["model"]
    assert (genai["eos_token_id"], genai["pad_token_id"]) == ([2, 3], 2)


def test_set_overrides_token_ids(tmp_path, capsys):
    out = tmp_path / "hf"
    rc, _, err = _mexc(capsys, "compile", EXAMPLE, "--target", "hf", "--tokenizer", TOKENIZER, "-o", out,
                       "--set", "eos_token_id=5", "--set", "pad_token_id=0")
    assert rc == 0, err
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 5, 0)
    rc, _, err = _mexc(capsys, "compile", EXAMPLE, "--target", "hf", "-o", tmp_path / "bad",
                       "--set", "bos_token_id=500")
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 1 and len(errors) == 1 and "[0, 101)" in errors[0] and not (tmp_path / "bad").exists()


def test_tokenizer_too_big_is_refused(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(str(TOKENIZER))
    tok.add_tokens([f"extra{i}" for i in range(40)])
    tok.save_pretrained(tmp_path / "big")
    rc, _, err = _mexc(capsys, "compile", EXAMPLE, "--target", "hf", "--tokenizer", tmp_path / "big",
                       "-o", tmp_path / "o")
    assert rc == 1 and "140 tokens" in err and "128 rows" in err and not (tmp_path / "o").exists()


# ------------------------------------------------------------------------- tokenizer forms


def _byte_vocab() -> tuple[dict[str, int], list[str]]:
    data = json.loads((TOKENIZER / "tokenizer.json").read_text())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["merges"]]
    return data["vocab"], merges


def test_gpt2_vocab_and_merges(tmp_path):
    transformers = pytest.importorskip("transformers")
    vocab, merges = _byte_vocab()
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    want = transformers.AutoTokenizer.from_pretrained(str(TOKENIZER))
    for arg in (tmp_path, tmp_path / "vocab.json", f"{tmp_path / 'vocab.json'},{tmp_path / 'merges.txt'}"):
        found = tokenizers.from_path(arg)
        assert found.kind == "gpt2"
        tok = tokenizers.load(found)
        for s in ("hello world from megatron", "the lazy dog sat"):
            assert tok.encode(s, add_special_tokens=False) == want.encode(s, add_special_tokens=False)


def test_sentencepiece_model(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(["the quick brown fox jumps over the lazy dog", "hello world from megatron",
                                 "a model compiles checkpoints to engines"] * 20))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=60,
                                   model_type="bpe", bos_id=1, eos_id=2, unk_id=0, pad_id=3,
                                   minloglevel=2)
    found = tokenizers.from_path(tmp_path / "sp.model")
    assert found.kind == "sentencepiece"
    tok = tokenizers.load(found)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    for s in ("hello world", "the lazy fox compiles engines"):
        assert tok.encode(s, add_special_tokens=False) == sp.encode(s)
    assert tokenizers.special_ids(tok) == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}
    files = tokenizers.save_files(tok)
    assert "tokenizer.json" in files and "tokenizer_config.json" in files


def test_tiktoken_file(tmp_path):
    tiktoken = pytest.importorskip("tiktoken")
    from tiktoken.load import load_tiktoken_bpe
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    vocab, _ = _byte_vocab()
    ranks = {bytes(byte_of[c] for c in tok): i for tok, i in vocab.items() if not tok.startswith("<")}
    for b in range(256):   # tiktoken needs every single byte
        ranks.setdefault(bytes([b]), max(ranks.values()) + 1)
    path = tmp_path / "tiny.tiktoken"
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n"
                            for t, r in sorted(ranks.items(), key=lambda kv: kv[1])))
    pattern = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
    enc = tiktoken.Encoding("tiny", pat_str=pattern, mergeable_ranks=load_tiktoken_bpe(str(path)), special_tokens={})
    tok = tokenizers.load(tokenizers.from_path(path))
    for s in ("hello world from megatron", "the quick brown fox!"):
        assert tok.encode(s, add_special_tokens=False) == enc.encode(s)


def test_megatron_tokenizer_args(tmp_path):
    vocab, merges = _byte_vocab()
    (tmp_path / "gpt2-vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "gpt2-merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    ns = argparse.Namespace(tokenizer_type="GPT2BPETokenizer", vocab_file=str(tmp_path / "gpt2-vocab.json"),
                            merge_file=str(tmp_path / "gpt2-merges.txt"), tokenizer_model=None)
    found, why = tokenizers.from_args(ns)
    assert why is None and found.kind == "gpt2" and "GPT2BPETokenizer" in found.origin
    ns.vocab_file = "/nonexistent/gpt2-vocab.json"
    found, why = tokenizers.from_args(ns)
    assert found is None and "/nonexistent/gpt2-vocab.json" in why and "not found" in why
    found, why = tokenizers.from_args(argparse.Namespace(tokenizer_type="TikTokenizer", tokenizer_model="x.json",
                                                         tiktoken_num_special_tokens=1000))
    assert found is None and "1000 special tokens" in why
    found, why = tokenizers.from_args(argparse.Namespace(tokenizer_type="HuggingFaceTokenizer",
                                                         tokenizer_model=str(TOKENIZER)))
    assert found.kind == "hf" and found.paths == (TOKENIZER,)


def test_compile_takes_the_tokenizer_the_args_name(tmp_path, capsys):
    """A checkpoint whose saved args name an HF tokenizer directory: compile writes it without --tokenizer."""
    torch = pytest.importorskip("torch")
    ckpt = tmp_path / "ckpt"
    shutil.copytree(EXAMPLE, ckpt)
    for f in ckpt.glob("iter_*/mp_rank_*/model_optim_rng.pt"):
        sd = torch.load(f, weights_only=False)   # the test's own copy of a trusted file
        sd["args"].tokenizer_type = "HuggingFaceTokenizer"
        sd["args"].tokenizer_model = str(TOKENIZER)
        torch.save(sd, f)
    out = tmp_path / "onnx"
    rc, _, err = _mexc(capsys, "compile", ckpt, "--target", "onnx", "-o", out)
    assert rc == 0, err
    assert "no tokenizer" not in err and (out / "tokenizer.json").is_file()
    m = json.loads((out / "mexc-manifest.json").read_text())["tokenizer"]
    assert "HuggingFaceTokenizer" in m["origin"]
    assert json.loads((out / "genai_config.json").read_text())["model"]["eos_token_id"] == 2


def test_bad_tokenizer_paths(tmp_path, capsys):
    rc, _, err = _mexc(capsys, "compile", EXAMPLE, "--target", "hf", "--tokenizer", tmp_path / "nope",
                       "-o", tmp_path / "o")
    assert rc == 1 and err.startswith(f"error: {tmp_path / 'nope'}: no such file") and "Traceback" not in err
    (tmp_path / "empty").mkdir()
    rc, _, err = _mexc(capsys, "compile", EXAMPLE, "--target", "hf", "--tokenizer", tmp_path / "empty",
                       "-o", tmp_path / "o")
    assert rc == 1 and "holds no tokenizer" in err and not (tmp_path / "o").exists()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": ')   # truncated
    (tmp_path / "bad.model").write_bytes(b"\n\x05junk")
    for bad in (tmp_path / "bad", tmp_path / "bad.model"):
        rc, _, err = _mexc(capsys, "compile", EXAMPLE, "--target", "onnx", "--tokenizer", bad, "-o", tmp_path / "o")
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert rc == 1 and len(errors) == 1 and "cannot read the" in errors[0] and "Traceback" not in err


def test_version(capsys):
    import mexc

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"mexc {mexc.__version__}"


def test_chat_template_and_special_tokens_carried(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(str(TOKENIZER))
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}</s>{% endfor %}"
    tok.pad_token = "<unk>"
    tok.save_pretrained(tmp_path / "chat")
    out = tmp_path / "hf"
    rc, _, err = _mexc(capsys, "compile", EXAMPLE, "--target", "hf", "--tokenizer", tmp_path / "chat", "-o", out)
    assert rc == 0, err
    got = transformers.AutoTokenizer.from_pretrained(str(out))
    assert got.chat_template == tok.chat_template and got.pad_token_id == 0
    assert got.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False) == "hello</s>"
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 0)


def test_progress_never_runs_past_its_total():
    from mexc.tools.cli import Progress

    p = Progress(enabled=False)
    p.start("write", 300)
    p.advance(400)   # an estimate that was too low (ONNX: tied / rope copies)
    assert p.total == p.done == 400


@pytest.mark.parametrize("args,want", [
    (["--ir", "--json"], "--ir prints the IR as text"),
    (["--draw", "x.svg"], "--draw applies to checkpoints, not to a compiled output"),
    (["--layers"], "--layers applies to checkpoints"),
])
def test_inspect_options_on_outputs(served, capsys, args, want):
    rc, _, err = _mexc(capsys, "inspect", served["onnx"], *args)
    assert rc == 2 and want in err


@pytest.mark.parametrize("extra,saved,want", [(0, None, 101), (10, None, 110), (0, 128, 100), (0, 120, 120)])
def test_default_vocab_follows_the_tokenizer(tmp_path, capsys, extra, saved, want):
    """The tokenizer's size (or the saved unpadded vocab when larger) becomes the vocab of every target; a saved
    vocab equal to the padded rows (args without an unpadded size) does not hide the padding."""
    transformers = pytest.importorskip("transformers")
    tok_dir = TOKENIZER
    if extra:
        tok = transformers.AutoTokenizer.from_pretrained(str(TOKENIZER))
        tok.add_tokens([f"extra{i}" for i in range(extra)])
        tok.save_pretrained(tmp_path / "tok")
        tok_dir = tmp_path / "tok"
    out = tmp_path / "onnx"
    args = ["compile", EXAMPLE, "--target", "onnx", "--tokenizer", tok_dir, "-o", out, "--json"]
    if saved:
        args += ["--set", f"vocab_size={saved}"]
    rc, stdout, err = _mexc(capsys, *args)
    assert rc == 0, err
    assert json.loads((out / "genai_config.json").read_text())["model"]["vocab_size"] == want
    assert any(n.startswith(f"vocab 128 -> {want}") for n in json.loads(stdout)["notes"]) == (want < 128)
