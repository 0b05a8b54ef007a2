"""Architecture overrides (``--set FIELD=VALUE`` / ``--config FILE.yaml``) pass the saved args' validators: a bad
override is one ``error:`` line naming the override and the fix, never a traceback nor a silently wrong model;
and the IR verifier's error is one line (the CLI prints ``error: <message>``).

Fixtures: megatron-core checkpoints (tests/megatron_fixtures.py): ``nope`` (no_rope_freq), ``softmax-scale``,
``window``, ``mla``, ``moe-grouped``."""

from __future__ import annotations

import pytest

from mexc import ir
from mexc.errors import IRError
from tiny_models import llama_ir, hf_llama


def test_verifier_error_is_one_line_with_at_most_three_problems(tmp_path):
    m = ir.parse(str(llama_ir(hf_llama(), tmp_path)))
    for n in m.graph.find("attention"):
        n.attrs["num_kv_heads"] = 3
    for n in m.graph.find("mlp"):
        n.stage = 5
    m.node("lm_head").stage = 3
    found = ir.problems(m)
    assert len(found) > 3
    with pytest.raises(IRError) as e:
        ir.verify(m)
    msg = e.value.message
    assert "\n" not in msg and "\\n" not in msg
    assert f"{len(found)} problem(s): " in msg and f"({len(found) - 3} more)" in msg
    assert msg.count("; ") == 2 and found[0] in msg and found[3] not in msg


# ------------------------------------------------------------------------------------- overrides on the CLI

megatron = pytest.importorskip("megatron_fixtures")
pytestmark = pytest.mark.skipif(not megatron.have_megatron_core(), reason="megatron-core not installed")

from mexc.errors import ConfigError  # noqa: E402
from mexc.frontends.megatron.config import MegatronArch, from_args  # noqa: E402
from mexc.tools.cli import main  # noqa: E402


def compile_error(kind: str, tmp_path, *flags: str) -> tuple[str, str]:
    """Compile fixture ``kind`` to hf with ``flags``: it must fail with exit code 1, one ``error:`` line and
    no traceback, writing nothing; returns (error line, hint line)."""
    import contextlib
    import io

    out, err = tmp_path / "out", io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(["compile", str(megatron.megatron_checkpoint(kind) / "ckpt"), "--target", "hf", "-o", str(out),
                   *flags])
    text = err.getvalue()
    lines = text.splitlines()
    assert rc == 1, text
    assert "Traceback" not in text and "\\n" not in text, text
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1, text
    assert not out.exists()
    hints = [ln for ln in lines if ln.startswith("hint:")]
    return errors[0], hints[0] if hints else ""


def config_file(tmp_path, text: str) -> str:
    p = tmp_path / "arch.yaml"
    p.write_text(text)
    return str(p)


@pytest.mark.parametrize("value", ["[1]", "3", "true", "[2,0]"])
def test_bad_no_rope_override_is_one_line_naming_it(value, tmp_path):
    err, hint = compile_error("nope", tmp_path, "--set", f"no_rope={value}")
    assert err.startswith("error: --set no_rope=") and "no_rope_freq" in err and "num_layers=2" in err
    assert "list of 0/1, one per layer" in hint


@pytest.mark.parametrize("value", ["0", "-0.5", ".inf", "abc"])
def test_softmax_scale_override_must_be_positive_and_finite(value, tmp_path):
    err, hint = compile_error("softmax-scale", tmp_path, "--set", f"softmax_scale={value}")
    assert err.startswith("error: --set softmax_scale=") and "is not a positive finite number" in err
    assert "--set softmax_scale=0.125" in hint


@pytest.mark.parametrize("kind, flag, says", [
    ("window", "window_skip=0", "window_attn_skip_freq = 0 is neither a positive int nor a 0/1 list"),
    ("gpt", "normalization=batchnorm", "normalization = batchnorm is not one of layernorm, rmsnorm"),
    ("gpt", "num_layers=0", "num_layers = 0 is not a size (1..16384)"),
    ("gpt", "tied=maybe", "tied = maybe is not true or false"),
    ("gpt", "dtype=f12", "dtype = f12 is not a dtype"),
    ("gpt", "qk_pos_emb_head_dim=8", "unknown field 'qk_pos_emb_head_dim'"),
    ("moe-grouped", "moe_num_groups=3", "num_experts=4 is not a multiple of moe_num_groups=3"),
])
def test_bad_set_override_names_the_flag_not_the_checkpoint(kind, flag, says, tmp_path):
    err, _ = compile_error(kind, tmp_path, "--set", flag)
    assert err.startswith(f"error: --set {flag}: ") and says in err
    assert "model_optim_rng.pt" not in err


def test_bad_config_override_names_the_file_and_field(tmp_path):
    path = config_file(tmp_path, "kv_lora_rank: \"32\"\n")
    err, hint = compile_error("mla", tmp_path, "--config", path)
    assert err.startswith(f"error: --config {path}: kv_lora_rank: 32: ") and "without quotes" in err
    assert "kv_lora_rank: N" in hint


@pytest.mark.parametrize("line, implied, saved", [
    ("kv_lora_rank: 16", "[24, 64]", "[40, 64]"),
    ("v_head_dim: 1000", "[4064, 32]", "[112, 32]"),
    ("qk_head_dim: 15", "[92, 64]", "[96, 64]"),
])
def test_config_size_against_saved_tensor_is_one_readable_line(line, implied, saved, tmp_path):
    path = config_file(tmp_path, line + "\n")
    err, hint = compile_error("mla", tmp_path, "--config", path)
    assert err.startswith(f"error: --config {path}: {line}: implies {implied} for ")
    assert f"the checkpoint's tensor is {saved}" in err and "more tensors disagree" in err
    assert "IR verification" not in err and "--print-ir-after" not in hint


def test_window_beyond_max_positions_is_refused(tmp_path):
    err, hint = compile_error("window", tmp_path, "--set", "window_size=[1000000000000,0]")
    assert err.startswith("error: --set window_size=[1000000000000, 0]: ")
    assert "max_position_embeddings=32" in err and "full attention" in err
    assert "--set window_size=null" in hint


def test_no_window_override_is_full_attention():
    ckpt = megatron.megatron_checkpoint("window") / "ckpt"
    from mexc.driver import lift

    model = lift(ckpt, overrides={"window_size": None})
    assert [n.attrs.get("window") for n in model.graph.find("attention")] == [None, None]


# -------------------------------------------------------------------------------------------- hints


def _mla_args(**kw) -> dict:
    return dict(num_layers=2, hidden_size=64, num_attention_heads=4, padded_vocab_size=128,
                multi_latent_attention=True, **kw)


def test_damaged_mla_args_hint_names_a_field_config_accepts():
    with pytest.raises(ConfigError) as e:
        from_args(_mla_args(qk_pos_emb_head_dim="x"), "CKPT")
    assert "qk_rope_dim" in e.value.hint and "qk_pos_emb_head_dim" not in e.value.hint
    assert from_args(_mla_args(qk_pos_emb_head_dim="x"), "CKPT", {"qk_rope_dim": 8}).qk_rope_dim == 8


@pytest.mark.parametrize("arg, field, value", [("num_attention_heads", "num_heads", 4),
                                                ("kv_channels", "head_dim", 16)])
def test_damaged_size_hint_names_the_field_and_the_field_cures_it(arg, field, value):
    args = dict(num_layers=2, hidden_size=64, num_attention_heads=4, padded_vocab_size=128)
    args[arg] = "x"
    with pytest.raises(ConfigError) as e:
        from_args(args, "CKPT")
    assert f"give {field} with --config" in e.value.hint
    assert getattr(from_args(args, "CKPT", {field: value}), field) == value


def test_every_hint_in_config_names_fields_config_accepts():
    import re
    from pathlib import Path

    import mexc.frontends.megatron.config as config

    known = {f.name for f in __import__("dataclasses").fields(MegatronArch)}
    text = Path(config.__file__).read_text()
    hints = re.findall(r'hint=(f?"[^\n]*(?:\n\s*f?"[^\n]*)*)', text)
    named = set()
    for h in hints:
        named |= set(re.findall(r"give (\w+)[ :]", h)) | set(re.findall(r"(?:set|give) `(\w+):", h))
        named |= set(re.findall(r"`(\w+): ", h)) | set(re.findall(r"--set (\w+)=", h))
        named |= set(re.findall(r"set (\w+): ", h))
    named -= {"it", "a", "the", "values", "them", "field"}
    assert named and named <= known, named - known
    named -= {"it", "a", "the", "values", "them", "field"}
    assert named and named <= known, named - known


def test_yarn_hint_field_cures_it():
    args = dict(num_layers=2, hidden_size=64, num_attention_heads=4, padded_vocab_size=128,
                position_embedding_type="yarn", rotary_interleaved=True, rotary_scaling_factor=4.0)
    with pytest.raises(ConfigError) as e:
        from_args(args, "CKPT")
    assert "`rope: {interleaved: false}`" in e.value.hint
    rope = from_args(args, "CKPT", {"rope": {"interleaved": False}}).rope
    assert (rope.scaling, rope.interleaved, rope.factor) == ("yarn", False, 4.0)
