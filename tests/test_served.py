"""From checkpoint to a served model (issue 19): the tokenizer carried into every output, its ids in the config
files, `mexc tokenizer`, `mexc run` (transformers and onnxruntime-genai agree token for token), the serve
commands checked against TensorRT-LLM's own argument parsers, summarised precondition errors, --version.

Oracles: transformers' tokenizer and model, onnxruntime-genai's tokenizer and generator, sentencepiece and
tiktoken for the converted tokenizers, TensorRT-LLM's parsers (tests/data/trtllm_parsers.py)."""

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
    assert cfg["vocab_size"] == 100   # the tokenizer's size: Megatron's 28 padding rows trimmed, as onnx does
    genai = json.loads((served["onnx"] / "genai_config.json").read_text())["model"]
    assert (genai["bos_token_id"], genai["eos_token_id"], genai["pad_token_id"], genai["vocab_size"]) == (1, 2, 2, 100)


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
    assert rc == 2 and "no tokenizer files" in err and f"mexc tokenizer {out} --from PATH" in err
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
    assert rc == 1 and len(errors) == 1 and "[0, 128)" in errors[0] and not (tmp_path / "bad").exists()


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


def test_version(capsys):
    import mexc

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"mexc {mexc.__version__}"


# ------------------------------------------------------------------------- serve commands vs TensorRT-LLM


def _trtllm_parsers() -> dict[str, argparse.ArgumentParser]:
    """argparse parsers rebuilt from TensorRT-LLM's declarations (tests/data/trtllm_parsers.py, read with ast):
    option names, nargs, required, store_true/false and literal choices as declared; click options as such."""
    import ast

    tree = ast.parse((Path(__file__).parent / "data" / "trtllm_parsers.py").read_text())
    parsers: dict[str, argparse.ArgumentParser] = {}

    def lit(node):
        try:
            return ast.literal_eval(node)
        except ValueError:
            return None

    for fn in tree.body:
        if not isinstance(fn, ast.FunctionDef):
            continue
        if fn.name == "serve":
            p = parsers["trtllm-serve"] = argparse.ArgumentParser(prog="trtllm-serve", exit_on_error=False)
            for dec in fn.decorator_list:
                kind = dec.func.attr
                names = [lit(a) for a in dec.args if isinstance(lit(a), str)]
                kw = {k.arg: k.value for k in dec.keywords}
                if kind == "argument":
                    p.add_argument(names[0])
                elif kind == "option":
                    opts = [n for n in names if n.startswith("-")]
                    if "is_flag" in kw:
                        p.add_argument(*opts, action="store_true")
                        continue
                    t = kw.get("type")
                    choices = None
                    if isinstance(t, ast.Call) and getattr(t.func, "id", "") == "ChoiceWithAlias":
                        choices = lit(t.args[0]) + list(lit(t.args[1]))
                    p.add_argument(*opts, choices=choices, action="append" if "multiple" in kw else "store")
        elif fn.name in ("RUN", "RUN_COMMON"):
            p = parsers.setdefault("run.py", argparse.ArgumentParser(prog="run.py", exit_on_error=False))
            for stmt in fn.body:
                call = stmt.value
                names = [lit(a) for a in call.args]
                kw = {k.arg: lit(k.value) for k in call.keywords}
                keep = {k: v for k, v in kw.items() if k in ("nargs", "required", "choices", "action", "dest")}
                p.add_argument(*names, **keep)
    return parsers


def _split(line: str) -> list[str]:
    import shlex

    return shlex.split(line.split("   (")[0])


def _check_with_trtllm(line: str, parsers) -> argparse.Namespace:
    words = _split(line)
    if words[:1] == ["mpirun"]:
        assert words[1] == "-n"
        words = words[3:]
    if words[0] == "python3":
        assert words[1] == "examples/run.py"
        return parsers["run.py"].parse_args(words[2:])
    assert words[0] == "trtllm-serve"
    return parsers["trtllm-serve"].parse_args(words[1:])


def test_trtllm_parsers_are_strict():
    """The rebuilt parsers refuse what TensorRT-LLM refuses (else the next test proves nothing)."""
    parsers = _trtllm_parsers()
    with pytest.raises(SystemExit):   # --max_output_len is required by run.py
        parsers["run.py"].parse_args(["--engine_dir", "e", "--tokenizer_dir", "t"])
    with pytest.raises((SystemExit, argparse.ArgumentError)):
        parsers["trtllm-serve"].parse_args(["e", "--backend", "engine"])
    with pytest.raises(SystemExit):
        parsers["trtllm-serve"].parse_args(["e", "--tokenizer_dir", "t"])


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 1), (2, 2)])
def test_trtllm_serve_commands_parse(tmp_path, capsys, tp, pp):
    parsers = _trtllm_parsers()
    out = tmp_path / "trt"
    rc, stdout, err = _mexc(capsys, "compile", EXAMPLE, "--target", "trtllm", "--tp", tp, "--pp", pp,
                            "--tokenizer", TOKENIZER, "-o", out, "--json")
    assert rc == 0, err
    lines = json.loads(stdout)["serve"]
    assert (out / "tokenizer.json").is_file()
    serve = _check_with_trtllm(next(x for x in lines if x.startswith("trtllm-serve")), parsers)
    assert serve.model == str(out / "engines") and serve.backend == "tensorrt" and serve.tokenizer == str(out)
    assert int(serve.tensor_parallel_size or 1) == tp and int(serve.pipeline_parallel_size or 1) == pp
    run_line = next(x for x in lines if "examples/run.py" in x)
    assert run_line.startswith(f"mpirun -n {tp * pp} ") == (tp * pp > 1)
    run = _check_with_trtllm(run_line, parsers)
    assert run.engine_dir == str(out / "engines") and run.tokenizer_dir == str(out) and int(run.max_output_len) > 0


def test_serve_commands_without_tokenizer_and_for_hf(tmp_path, capsys):
    parsers = _trtllm_parsers()
    out = tmp_path / "trt"
    rc, stdout, _ = _mexc(capsys, "compile", EXAMPLE, "--target", "trtllm", "-o", out, "--json")
    lines = json.loads(stdout)["serve"]
    assert lines[0].startswith(f"first add the tokenizer: mexc tokenizer {out} --from PATH")
    assert _check_with_trtllm(lines[1], parsers).tokenizer == "TOKENIZER_DIR"
    rc, _, err = _mexc(capsys, "run", out, "--prompt", "hi")
    assert rc == 2 and "runs on a GPU" in err and "trtllm-serve" in err
    out = tmp_path / "hf"
    rc, stdout, _ = _mexc(capsys, "compile", EXAMPLE, "--target", "hf", "--tokenizer", TOKENIZER, "-o", out,
                          "--json")
    lines = json.loads(stdout)["serve"]
    hf_serve = _check_with_trtllm(next(x for x in lines if x.startswith("trtllm-serve")), parsers)
    assert hf_serve.model == str(out) and hf_serve.backend is None   # the default, pytorch, reads HF dirs
    assert f"vllm serve {out}" in lines


# ------------------------------------------------------------------------- TensorRT detection


def test_tensorrt_stubs_are_not_tensorrt(tmp_path, capsys, monkeypatch):
    """tensorrt-stubs makes `import tensorrt` succeed with an empty namespace package: not TensorRT."""
    import sys
    import types

    from mexc.backends.onnx.tensorrt import tensorrt_status

    stub = types.ModuleType("tensorrt")
    stub.__path__ = [str(tmp_path / "site-packages" / "tensorrt")]   # a namespace package: no __version__
    monkeypatch.setitem(sys.modules, "tensorrt", stub)
    version, why = tensorrt_status()
    assert version is None and "tensorrt-stubs" in why and "Builder" in why
    out = tmp_path / "trt"
    rc, _, err = _mexc(capsys, "compile", EXAMPLE, "--target", "tensorrt", "-o", out)
    assert rc == 0 and "Traceback" not in err and (out / "model.onnx").is_file() and not (out / "model.plan").exists()
    assert "TensorRT is not installed" in err and "trtexec --onnx=" in err
    rc, _, err = _mexc(capsys, "compile", EXAMPLE, "--target", "tensorrt", "--build", "always", "-o", tmp_path / "a")
    assert rc == 1 and "tensorrt-stubs" in err and not (tmp_path / "a").exists()
    real = types.ModuleType("tensorrt")
    real.__version__ = "10.15.1"
    for name in ("Logger", "Builder", "OnnxParser", "NetworkDefinitionCreationFlag"):
        setattr(real, name, object)
    monkeypatch.setitem(sys.modules, "tensorrt", real)
    assert tensorrt_status() == ("10.15.1", "")


# ------------------------------------------------------------------------- summarised preconditions


@pytest.mark.parametrize("args,want", [
    (["--tp", "3"], "error: --tp 3 does not divide 4 attention heads / 2 KV heads; use --tp 1, 2 or 4"),
    (["--tp", "8"], "error: --tp 8 does not divide 4 attention heads / 2 KV heads; use --tp 1, 2 or 4"),
    (["--pp", "3"], "error: --pp 3 exceeds the model's 2 layers; use --pp 1 or 2"),
])
def test_layout_errors_are_one_line(tmp_path, capsys, args, want):
    rc, _, err = _mexc(capsys, "compile", EXAMPLE, "--target", "trtllm", *args, "-o", tmp_path / "o", "--quiet")
    lines = err.splitlines()
    assert rc == 2 and lines[0] == want and lines[1].startswith("hint: ") and len(lines) == 2
    assert len(err) < 300 and not (tmp_path / "o").exists()
    for tp in (1, 2, 4):   # the sizes the error offers do compile
        if "--tp" in args:
            assert main(["compile", str(EXAMPLE), "--target", "trtllm", "--tp", str(tp), "-o",
                         str(tmp_path / f"tp{tp}"), "--quiet"]) == 0


# ------------------------------------------------------------------------- options honoured or refused


@pytest.mark.parametrize("args,want", [
    (["--target", "hf", "--max-seq-len", "64"], "--max-seq-len does nothing for --target hf"),
    (["--target", "hf", "--max-batch-size", "4"], "--max-batch-size does nothing for --target hf"),
    (["--target", "trtllm", "--profile", "ort"], "--profile does nothing for --target trtllm"),
    (["--target", "onnx", "--max-input-len", "16"], "--max-input-len does nothing for --target onnx"),
    (["--target", "tensorrt", "--profile", "ort"], "--profile ort contradicts it"),
    (["--target", "onnx", "--group-size", "64"], "--group-size 64 without --quant"),
    (["--target", "trtllm", "--max-input-len", "4096"], "--max-input-len 4096 is longer than --max-seq-len 2048"),
    (["--target", "trtllm", "--print-ir-after", "reshrd"], "--print-ir-after reshrd: no such pass"),
    (["--target", "hf", "--parallel-embedding"], "--parallel-embedding does nothing for --target hf"),
])
def test_ignored_compile_options_are_refused(tmp_path, capsys, args, want):
    rc, _, err = _mexc(capsys, "compile", EXAMPLE, *args, "-o", tmp_path / "o")
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(errors) == 1 and want in errors[0] and not (tmp_path / "o").exists()


def test_print_ir_after_a_pass_of_the_pipeline(tmp_path, capsys):
    rc, _, err = _mexc(capsys, "compile", EXAMPLE, "--target", "trtllm", "--print-ir-after", "reshard",
                       "-o", tmp_path / "o")
    assert rc == 0 and "reshard" in err and "attention" in err


@pytest.mark.parametrize("args,want", [
    (["--ir", "--json"], "--ir prints the IR as text"),
    (["--draw", "x.svg"], "--draw applies to checkpoints, not to a compiled output"),
    (["--layers"], "--layers applies to checkpoints"),
])
def test_inspect_options_on_outputs(served, capsys, args, want):
    rc, _, err = _mexc(capsys, "inspect", served["onnx"], *args)
    assert rc == 2 and want in err


def test_learned_positions_bound_the_sequence(tmp_path, capsys):
    """GPT's learned position table (32 rows in the fixture): the default 2048 is lowered with a note, an
    explicit larger --max-seq-len is refused; the trtllm-build line says the same length."""
    from megatron_fixtures import have_megatron_core, megatron_checkpoint

    if not have_megatron_core():
        pytest.skip("megatron-core not installed")
    ckpt = megatron_checkpoint("gpt", 1, 1, "torch") / "ckpt"
    rows = json.loads((megatron_checkpoint("gpt", 1, 1, "torch") / "fixture.json").read_text())
    rc, stdout, err = _mexc(capsys, "compile", ckpt, "--target", "trtllm", "-o", tmp_path / "o", "--json")
    assert rc == 0, err
    notes = json.loads(stdout)["notes"]
    n = next(x for x in notes if x.startswith("sequence length"))
    table = int(n.split()[2])
    assert table < 2048 and f"--max_seq_len {table} " in next(x for x in notes if "trtllm-build" in x)
    assert json.loads((tmp_path / "o" / "mexc-manifest.json").read_text())["options"]["max_seq_len"] == table
    rc, _, err = _mexc(capsys, "compile", ckpt, "--target", "trtllm", "--max-seq-len", table + 1, "-o", tmp_path / "p")
    assert rc == 2 and f"beyond the model's learned position table ({table} positions)" in err
    assert rows  # the fixture's hyper-parameters are there (the table size is the model's, read from the IR)


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
