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
