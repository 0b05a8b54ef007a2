"""From checkpoint to a served model (issue 19), the command side: serve commands parsed by TensorRT-LLM's own
argument parsers (declarations copied in tests/data/trtllm_parsers.py, commits named there), real-TensorRT
detection (tensorrt-stubs is not TensorRT), layout errors in one line with the sizes that fit, options a target
would ignore refused."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from mexc.tools.cli import main

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "llama-tiny"
TOKENIZER = ROOT / "examples" / "llama-tiny-tokenizer"


def _mexc(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


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
    assert rc == 1 and "runs on a GPU" in err and "trtllm-serve" in err
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
    (["--target", "hf", "--accuracy-level", "4"], "--accuracy-level does nothing for --target hf"),
    (["--target", "trtllm", "--max-shard-size", "4096"], "--max-shard-size does nothing for --target trtllm"),
])
def test_ignored_compile_options_are_refused(tmp_path, capsys, args, want):
    rc, _, err = _mexc(capsys, "compile", EXAMPLE, *args, "-o", tmp_path / "o")
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(errors) == 1 and want in errors[0] and not (tmp_path / "o").exists()


def test_print_ir_after_a_pass_of_the_pipeline(tmp_path, capsys):
    rc, _, err = _mexc(capsys, "compile", EXAMPLE, "--target", "trtllm", "--print-ir-after", "reshard",
                       "-o", tmp_path / "o")
    assert rc == 0 and "reshard" in err and "attention" in err


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


def test_tokenizer_added_to_a_trtllm_output(tmp_path, capsys):
    """`mexc tokenizer` on a trtllm output: the files for --tokenizer_dir, and the serve lines then name OUT."""
    from mexc.backends.serve import serve_commands

    out = tmp_path / "trt"
    assert _mexc(capsys, "compile", EXAMPLE, "--target", "trtllm", "--tp", 2, "-o", out, "--quiet")[0] == 0
    assert any("TOKENIZER_DIR" in x for x in serve_commands(out))
    rc, _, err = _mexc(capsys, "tokenizer", out, "--from", TOKENIZER)
    assert rc == 0, err
    assert (out / "tokenizer.json").is_file() and json.loads((out / "config.json").read_text())["vocab_size"] == 101   # padding trimmed: NullTokenizer 100 + eod
    lines = serve_commands(out)
    assert not any("TOKENIZER_DIR" in x for x in lines) and f"--tokenizer {out}" in lines[0]


def test_run_refuses_what_it_cannot_run(tmp_path, capsys):
    rc, _, err = _mexc(capsys, "run", tmp_path, "--prompt", "hi")
    assert rc == 1 and "not a mexc output" in err   # an input at fault: exit 1
    out = tmp_path / "trt-profile"
    assert _mexc(capsys, "compile", EXAMPLE, "--target", "onnx", "--profile", "tensorrt", "--tokenizer", TOKENIZER,
                 "-o", out, "--quiet")[0] == 0
    rc, _, err = _mexc(capsys, "run", out, "--prompt", "hi")
    assert rc == 1 and "--profile ort" in err
