"""The `mexc` command's contract with its user: flags a target cannot take are refused before anything is read
(one `error:` and one `hint:` line), exit codes by kind of failure, and a start-up that imports no torch for
help and usage errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "llama-tiny"


def run_main(*args, probe=False):
    """`mexc ARGS` in a fresh interpreter; with ``probe`` it also reports whether torch (and friends) got
    imported by the time the command returned."""
    code = ("import sys, json\nfrom mexc.tools.cli import main\ntry:\n    rc = main(sys.argv[1:])\n"
            "except SystemExit as e:\n    rc = e.code\n"
            "heavy = sorted(m for m in ('torch', 'numpy', 'transformers', 'onnx', 'safetensors') if m in sys.modules)\n"
            "sys.stdout.write('\\n@@' + json.dumps({'rc': rc, 'heavy': heavy}))\nsys.exit(rc)\n")
    r = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, cwd=ROOT)
    out, _, tail = r.stdout.rpartition("\n@@")
    return r, out, json.loads(tail) if probe else None


def one_error(stderr: str) -> tuple[str, str]:
    lines = stderr.splitlines()
    assert len(lines) == 2 and lines[0].startswith("error: ") and lines[1].startswith("hint: "), stderr
    assert "Traceback" not in stderr and "(hint:" not in stderr, stderr
    return lines[0], lines[1]


# ------------------------------------------------------------------ item 1: refused before any tensor is read


@pytest.mark.parametrize("args,want", [
    (["--target", "hf", "--tp", "2"], "--tp 2: the hf target writes one unsharded model"),
    (["--target", "hf", "--pp", "2", "--ep", "2"], "--pp 2 --ep 2: the hf target writes one unsharded model"),
    (["--target", "hf", "--quant", "int8-wo"], "--quant int8-wo does nothing the hf target can express"),
    (["--target", "onnx", "--tp", "2"], "--tp 2: the ONNX graph is single-device"),
    (["--target", "tensorrt", "--pp", "2"], "--pp 2: the ONNX graph is single-device"),
    (["--target", "onnx", "--quant", "int4-wo", "--dtype", "bfloat16"], "MatMulNBits has no bfloat16 kernel"),
    (["--target", "onnx", "--quant", "int4-wo", "--group-size", "24"], "--group-size 24: ONNX Runtime's MatMulNBits"),
    (["--target", "trtllm", "--quant", "int4-wo", "--group-size", "64"], "group-wise int4 (AWQ/GPTQ)"),
    (["--target", "trtllm", "--tp", "2", "--ep", "4"], "--ep 4 with --tp 2"),
])
def test_target_refusals_come_before_the_checkpoint_is_read(tmp_path, args, want):
    """A checkpoint that does not exist proves nothing was read: the flag refusal comes first, in one
    error and one hint line, exit 2, and without importing torch."""
    r, _, probe = run_main("compile", tmp_path / "no-such-ckpt", *args, "-o", tmp_path / "o", probe=True)
    err, _ = one_error(r.stderr)
    assert want in err and probe["rc"] == 2 and probe["heavy"] == [], (r.stderr, probe)
    assert not (tmp_path / "o").exists()


def test_the_same_flags_on_a_target_that_takes_them_get_past_the_check(tmp_path):
    """The refusals are per target: --tp 2 for trtllm, --quant int4-wo --group-size 64 for onnx go on to the
    checkpoint (here a missing one: the error is then about the checkpoint, exit 1)."""
    for args in (["--target", "trtllm", "--tp", "2"], ["--target", "onnx", "--quant", "int4-wo", "--group-size", "64"]):
        r, _, _ = run_main("compile", tmp_path / "no-such-ckpt", *args, "-o", tmp_path / "o")
        err, _ = one_error(r.stderr)
        assert "no-such-ckpt" in err and r.returncode == 1, r.stderr


def test_expert_parallel_on_a_dense_model_names_the_missing_experts(tmp_path):
    """--tp 2 --ep 2 on the dense example: the error names --ep, not a TP size that divides fine."""
    r, _, _ = run_main("compile", EXAMPLE, "--target", "trtllm", "--tp", "2", "--ep", "2", "-o", tmp_path / "o",
                        "--quiet")
    err, hint = one_error(r.stderr)
    assert "--ep 2: this llama model has no experts" in err and "drop --ep" in hint and r.returncode == 2


def test_a_group_size_the_weights_cannot_take_is_one_short_line(tmp_path):
    """quantize's precondition names every weight (900+ characters on the tiny example): one line instead,
    with the group sizes that fit."""
    r, _, _ = run_main("compile", EXAMPLE, "--target", "onnx", "--quant", "int4-wo", "--group-size", "128", "-o",
                       tmp_path / "o", "--quiet")
    err, hint = one_error(r.stderr)
    assert err == ("error: --group-size 128 does not divide the input features of the quantized weights (64 of "
                   "64 / 128); use --group-size 16, 32 or 64") and r.returncode == 2
    assert len(r.stderr) < 250 and not (tmp_path / "o").exists()


def test_a_lowering_problem_has_one_hint_line():
    """backend.check's problems carry their own '(hint: ...)': the error moves it to the hint line."""
    from mexc.driver import lowering_error

    e = lowering_error("onnx", ["node 3 (moe, layer 1): quantized MoE experts are not supported (hint: exclude "
                                "moe from quantize)", "a MoE top-k scaling factor is not lowered; run fold-moe-scaling"])
    assert e.message == ("the onnx target cannot lower this model: node 3 (moe, layer 1): quantized MoE experts are "
                         "not supported; a MoE top-k scaling factor is not lowered; run fold-moe-scaling")
    assert e.hint == "exclude moe from quantize"
    assert lowering_error("hf", ["no class"]).hint == "see docs/targets.md for what each target supports"


# ------------------------------------------------------------------ item 2: never advertise what nothing does


def test_help_offers_only_quant_schemes_a_target_takes(tmp_path):
    """fp8 is refused by every target (calibrated activation scales): --help does not list it, and asking
    for it says why in the hint."""
    from mexc.tools.cli import make_parser

    compile_parser = next(a for a in make_parser()._actions if a.dest == "cmd").choices["compile"]
    quant = next(a for a in compile_parser._actions if a.dest == "quant")
    assert list(quant.choices) == ["int8-wo", "int4-wo"] and "fp8" not in compile_parser.format_usage()
    r, _, _ = run_main("compile", EXAMPLE, "--target", "trtllm", "--quant", "fp8", "-o", tmp_path / "o")
    err, hint = one_error(r.stderr)
    assert "invalid choice: 'fp8'" in err and "calibration data" in hint and r.returncode == 2


# ------------------------------------------------------------------ item 3: exit codes by kind of failure


def test_exit_codes_follow_the_kind_of_failure(tmp_path):
    """Representative failures of each kind, through the real command (errors.py documents the codes; so do
    `mexc --help` and the README)."""
    from mexc.errors import EXIT_INPUT, EXIT_INTERNAL, EXIT_USAGE

    bogus = tmp_path / "bogus"
    bogus.mkdir()
    (bogus / "mexc-manifest.json").write_text("{not json")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "x.txt").write_text("a user's file")
    cases = {
        EXIT_USAGE: [
            ["compile", EXAMPLE, "--target", "tflite", "-o", tmp_path / "o"],          # argparse: bad choice
            ["compile", EXAMPLE, "--target", "hf", "--profile", "ort", "-o", tmp_path / "o"],  # ignored flag
            ["compile", EXAMPLE, "--target", "hf", "--tp", "2", "-o", tmp_path / "o"],   # target cannot do it
            ["compile", EXAMPLE, "--target", "trtllm", "--tp", "3", "-o", tmp_path / "o", "--quiet"],  # model
            ["compile", EXAMPLE, "--target", "hf", "-o", notes, "--force", "--quiet"],   # -o not mexc's
            ["passes", "make-it-fast"],
        ],
        EXIT_INPUT: [
            ["compile", tmp_path / "nope", "--target", "hf", "-o", tmp_path / "o"],      # no checkpoint
            ["compile", EXAMPLE, "--target", "hf", "--config", tmp_path / "no.yaml", "-o", tmp_path / "o"],
            ["verify", bogus, "--against", EXAMPLE],                                     # damaged output
            ["run", tmp_path / "nope", "--prompt", "hi"],                                # not an output
            ["inspect", notes],                                                          # not a checkpoint
        ],
    }
    for code, runs in cases.items():
        for args in runs:
            r, _, _ = run_main(*args)
            assert r.returncode == code, (args, r.returncode, r.stderr)
            one_error(r.stderr)
    assert (notes / "x.txt").is_file() and not (tmp_path / "o").exists()
    # a bug (an exception mexc did not raise on purpose): traceback, one error line, exit 3
    code = ("import sys, mexc.tools.cli as cli\n"
            "def boom(a):\n    raise ZeroDivisionError('a bug')\n"
            "cli.cmd_passes = boom\nsys.exit(cli.main(['passes']))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    lines = r.stderr.splitlines()
    assert r.returncode == EXIT_INTERNAL and lines[0].startswith("Traceback"), r.stderr
    assert lines[-2] == ("error: internal error in mexc (a bug, not a fault of the input): ZeroDivisionError: a bug")
    assert lines[-1].startswith("hint: please report it")


def test_exit_codes_are_documented():
    from mexc.tools.cli import EXIT_CODES

    r = subprocess.run([sys.executable, "-m", "mexc.tools.cli", "--help"], capture_output=True, text=True, cwd=ROOT)
    readme = (ROOT / "README.md").read_text()
    for code in ("0", "1", "2", "3", "130"):
        assert f"\n  {code} " in EXIT_CODES and f"| {code} |" in readme, code
    assert EXIT_CODES in r.stdout


# ------------------------------------------------------------------ item 5: vocab padding alike on every target


@pytest.mark.parametrize("keep", [False, True])
def test_every_target_treats_vocab_padding_alike_without_a_tokenizer(tmp_path, keep):
    """The example (NullTokenizer: 100 ids + eod = 101, padded to 128 rows) without a tokenizer: hf, trtllm and
    onnx all trim to the saved args' 101 ids with one note (issue 19 item 7: hf and trtllm kept 128 rows);
    --vocab-size 128 keeps the padding on all three. `inspect` and each config agree."""
    import onnx
    from safetensors import safe_open

    want = 128 if keep else 101
    for target in ("hf", "trtllm", "onnx"):
        out = tmp_path / target
        args = ["compile", EXAMPLE, "--target", target, "-o", out, "--json", "--build", "never"]
        if target == "trtllm":
            args += ["--tp", "2"]
        r, stdout, _ = run_main(*args + (["--vocab-size", "128"] if keep else []))
        assert r.returncode == 0, r.stderr
        notes = [n for n in json.loads(stdout)["notes"] if n.startswith("vocab 128 -> ")]
        assert notes == ([] if keep else ["vocab 128 -> 101: trimmed Megatron's padding rows to the 101 ids of the "
                                          "saved args (no tokenizer; --vocab-size 128 keeps them)"]), (target, notes)
        if target == "hf":
            assert json.loads((out / "config.json").read_text())["vocab_size"] == want
            with safe_open(out / "model.safetensors", "pt") as f:
                assert f.get_slice("model.embed_tokens.weight").get_shape()[0] == want
        elif target == "trtllm":
            assert json.loads((out / "config.json").read_text())["vocab_size"] == want
            with safe_open(out / "rank0.safetensors", "pt") as f:   # lm_head split over tp=2, padded to even rows
                assert f.get_slice("lm_head.weight").get_shape()[0] == (want + 1) // 2
        else:
            assert json.loads((out / "genai_config.json").read_text())["model"]["vocab_size"] == want
            graph = onnx.load(out / "model.onnx", load_external_data=False).graph
            logits = next(o for o in graph.output if o.name == "logits")
            assert logits.type.tensor_type.shape.dim[-1].dim_value == want
        r, stdout, _ = run_main("inspect", out, "--json")
        assert r.returncode == 0 and json.loads(stdout)["model"]["vocab_size"] == want, (target, stdout)


# ------------------------------------------------------------------ item 6: short hints that name the next step


def test_run_on_a_gpu_output_gives_one_short_command(tmp_path):
    """`mexc run` on a trtllm output: the hint is one command (tokenizer step first when there is none), not
    every serve line joined (448 characters before)."""
    out = tmp_path / "trt"
    r, _, _ = run_main("compile", EXAMPLE, "--target", "trtllm", "--tp", "2", "-o", out, "--quiet")
    assert r.returncode == 0, r.stderr
    r, _, _ = run_main("run", out, "--prompt", "hi")
    err, hint = one_error(r.stderr)
    assert r.returncode == 1 and "runs on a GPU with TensorRT-LLM" in err
    assert hint == (f"hint: on a GPU machine: mexc tokenizer {out} --from PATH, then trtllm-serve {out}/engines "
                    f"--backend tensorrt --tokenizer {out} --tp_size 2 --pp_size 1 (other ways: docs/targets.md)")


NEMO = ROOT / "tests" / "data" / "wrappers" / "nemo-2.7.3" / "llama-checkpoint"   # NeMo 2.7.3's own save
STEP = "megatron_gpt--step=9-consumed_samples=20.0"


def test_a_nemo_trainer_folder_names_the_checkpoint_to_give(tmp_path):
    """NeMo's ModelCheckpoint folder (one directory per saved step) or the run directory above it: the error
    says what it is and the hint names the latest checkpoint, which then compiles; a checkpoint's context/
    stands for the checkpoint, as its weights/ does."""
    import shutil

    r, _, _ = run_main("inspect", NEMO)
    err, hint = one_error(r.stderr)
    assert err == f"error: {NEMO}: a NeMo trainer's checkpoint folder holds 1 NeMo checkpoint (step 9); mexc reads one checkpoint"
    assert hint == f"hint: give one of them, e.g. the latest: {NEMO / STEP}" and r.returncode == 1
    run = tmp_path / "run"
    for name in ("x--step=9-consumed_samples=20.0", "x--step=19-consumed_samples=40.0",
                 "x--step=19-consumed_samples=40.0-last"):
        shutil.copytree(NEMO / STEP, run / "checkpoints" / name)
    r, _, _ = run_main("compile", run, "--target", "hf", "-o", tmp_path / "o")
    err, hint = one_error(r.stderr)
    assert "a NeMo run directory: its checkpoints/ holds 3 NeMo checkpoints (steps 9, 19)" in err
    latest = run / "checkpoints" / "x--step=19-consumed_samples=40.0-last"
    assert hint == f"hint: give one of them, e.g. the latest: {latest}" and not (tmp_path / "o").exists()
    r, _, _ = run_main("compile", latest / "context", "--target", "hf", "-o", tmp_path / "o", "--quiet")
    assert r.returncode == 0 and json.loads((tmp_path / "o" / "mexc-manifest.json").read_text())["target"] == "hf"


# ------------------------------------------------------------------ item 7: start-up without torch


def test_importing_the_command_imports_no_torch():
    r = subprocess.run([sys.executable, "-c", "import sys, mexc.tools.cli, mexc.driver, mexc.tools.compile_flags; "
                        "print(sorted(m for m in ('torch', 'numpy', 'transformers', 'onnx') if m in sys.modules))"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


def test_help_and_usage_errors_import_no_torch(tmp_path):
    """What tools/bench_startup.py times: help and usage errors are answered before torch is imported (the
    figures themselves are not asserted: no timed tests)."""
    (tmp_path / "exists").mkdir()
    runs = [(["--help"], 0), (["--version"], 0), (["compile", "--help"], 0), (["compile"], 2),
            (["compile", EXAMPLE, "--target", "hf", "-o", tmp_path / "exists"], 2),
            (["compile", EXAMPLE, "--target", "trtllm", "-o", EXAMPLE / "out"], 2),     # -o inside the checkpoint
            (["inspect", EXAMPLE, "--ir", "--json"], 2)]
    for args, code in runs:
        r, _, probe = run_main(*args, probe=True)
        assert probe == {"rc": code, "heavy": []}, (args, probe, r.stderr)


def test_mexc_tokenizer_with_a_missing_source_names_its_own_flag(tmp_path):
    out = tmp_path / "hf"
    assert run_main("compile", EXAMPLE, "--target", "hf", "-o", out, "--quiet")[0].returncode == 0
    r, _, _ = run_main("tokenizer", out, "--from", tmp_path / "nope")
    err, hint = one_error(r.stderr)
    assert err == f"error: {tmp_path / 'nope'}: no such file or directory (from --from)" and r.returncode == 1
    assert hint.startswith("hint: give --from the tokenizer's path") and "--tokenizer" not in hint


@pytest.mark.parametrize("kind,target,takes", [
    ("qwen", "trtllm", ["onnx"]),                  # q/k/v bias + partial rotary: no hf class either (found by QA)
    ("deepseek-v3", "trtllm", ["hf", "onnx"]),     # sigmoid-routed MLA: DeepseekV3ForCausalLM, onnx
    ("output-gate-plain", "hf", ["onnx"]),         # the gate without q/k norms: only the onnx lowering
])
def test_a_refusal_names_only_targets_that_take_the_model(tmp_path, capsys, kind, target, takes):
    """The hint is computed (each other built-in target's legalization and check on a fresh lift), never a
    hard-coded "use --target hf" that the other target refuses too."""
    from megatron_fixtures import have_megatron_core, megatron_checkpoint

    if not have_megatron_core():
        pytest.skip("megatron-core not installed")
    from mexc.tools.cli import main

    out = tmp_path / "out"
    assert main(["compile", str(megatron_checkpoint(kind) / "ckpt"), "--target", target, "-o", str(out),
                 "--build", "never", "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[0].startswith("error: ") and err[1].startswith("hint: "), err
    assert err[1].endswith("targets that take this model as it is: " + ", ".join(f"--target {t}" for t in takes))
    assert "use --target" not in err[0] and not out.exists()
    for t in takes:                       # and they do
        assert main(["compile", str(megatron_checkpoint(kind) / "ckpt"), "--target", t, "-o", str(tmp_path / t),
                     "--build", "never", "--quiet"]) == 0


@pytest.mark.parametrize("kind,target,flags,hint", [
    # with the user's flags nothing else takes it: the targets that do without them, and which flags (found by QA)
    ("glm4-moe", "trtllm", ["--quant", "int8-wo"], "without --quant: --target hf, --target onnx"),
    ("deepseek-v3", "trtllm", ["--tp", "2"], "without --tp: --target hf, --target onnx"),
    # flags another target takes too are carried over
    ("deepseek-v3", "trtllm", ["--dtype", "bfloat16"], "as it is: --target hf, --target onnx"),
])
def test_a_refusal_hint_accounts_for_the_flags_given(tmp_path, capsys, kind, target, flags, hint):
    from megatron_fixtures import have_megatron_core, megatron_checkpoint

    if not have_megatron_core():
        pytest.skip("megatron-core not installed")
    from mexc.tools.cli import main

    assert main(["compile", str(megatron_checkpoint(kind) / "ckpt"), "--target", target, *flags, "-o",
                 str(tmp_path / "o"), "--build", "never", "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[1].endswith("targets that take this model " + hint), err
