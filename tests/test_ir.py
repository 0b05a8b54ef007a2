"""The IR: text form round trip, verifier, lazy recipes, reference executor vs transformers."""

import pytest
import torch

from mexc import ir
from mexc.backends.reference.executor import run
from mexc.errors import IRError, ParseError
from tiny_models import TOKENS, gpt2_ir, hf_gpt2, hf_llama, llama_ir


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    hf = hf_llama()
    return hf, llama_ir(hf, tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    hf = hf_gpt2()
    return hf, gpt2_ir(hf, tmp_path_factory.mktemp("gpt2"))


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_print_parse_print_is_a_fixed_point(which, request):
    _, model = request.getfixturevalue(which)
    ir.verify(model)
    text = str(model)
    again = ir.parse(text)
    assert str(again) == text
    assert ir.structurally_equal(model, again)
    ir.verify(again)


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_reference_executor_matches_transformers(which, request):
    hf, model = request.getfixturevalue(which)
    with torch.no_grad():
        want = hf(TOKENS).logits
    got = run(model, TOKENS)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() < 1e-5


def test_parsed_model_computes_the_same_logits(llama):
    _, model = llama
    assert torch.equal(run(ir.parse(str(model)), TOKENS), run(model, TOKENS))


def test_text_form_shows_types_layouts_and_recipes(gpt2):
    text = str(gpt2[1])
    assert "qkv: f32[192,64] qkv:concat(q=4,kv=4,d=16) replicated = tag_qkv(transpose(load(w," in text
    assert "lm_head(%" in text and "tied=True" in text


def test_recipe_types_are_known_without_reading(llama, monkeypatch):
    _, model = llama
    reads = []
    store = model.stores["w"]
    orig = store.read
    monkeypatch.setattr(store, "read", lambda k, t: reads.append(k) or orig(k, t))
    qkv = ir.derive("concat", *(model.node("attention", 0).params[k].source for k in ("q", "k", "v")), dim=0)
    cast = ir.derive("cast", qkv, dtype="bf16")
    assert cast.type == ir.TensorType(ir.bf16, (128, 64))
    assert reads == []
    assert cast.materialize().dtype == torch.bfloat16
    assert len(reads) == 3


def test_slice_of_concat_simplifies_to_the_piece(llama):
    _, model = llama
    a = model.node("attention", 0)
    cat = ir.derive("concat", a.params["q"].source, a.params["k"].source, dim=0)
    piece = ir.derive("slice", cat, dim=0, start=64, stop=96)
    assert piece == a.params["k"].source  # no copy, reads only k


def test_verifier_names_the_node_and_the_problem(llama, tmp_path):
    _, model = llama
    broken = ir.parse(str(model))
    attn = broken.node("attention", 1)
    attn.attrs["num_kv_heads"] = 3
    with pytest.raises(IRError) as e:
        ir.verify(broken)
    assert "node 8 (attention, layer 1)" in e.value.message
    assert "num_heads=4 is not a multiple of num_kv_heads=3" in e.value.message


def test_verifier_catches_bad_shapes_and_stages(gpt2):
    _, model = gpt2
    m = ir.parse(str(model))
    m.node("mlp", 0).params["fc1_bias"] = ir.Param(ir.derive("slice", m.node("mlp", 0).params["fc1_bias"].source,
                                                             dim=0, start=0, stop=10))
    m.node("lm_head").stage = 3
    msg = "\n".join(ir.problems(m))
    assert "param 'fc1_bias' has shape [10], expected [256]" in msg
    assert "lm_head must be on the last stage" in msg


def test_use_def_links_are_kept(llama):
    _, model = llama
    m = ir.parse(str(model))
    emb = m.node("embedding")
    users = list(emb.output.uses)
    assert {u.op for u in users} == {"norm", "add"}
    with pytest.raises(IRError):
        m.graph.remove(emb)
    g = m.graph.to_networkx()
    assert g.number_of_nodes() == len(m.graph.nodes)
    assert g.has_edge(0, 1)


@pytest.mark.parametrize("bad", [
    "nonsense line",
    'mexc.model(family="x", hidden_size=4, num_layers=0, vocab_size=4)\n%0 = embedding(%nope) stage=0',
    'mexc.model(family="x", hidden_size=4, num_layers=0, vocab_size=4)\n%0 = norm(%input_ids) stage=0 {kind=__import__("os")}',
])
def test_parse_errors_are_clear(bad):
    with pytest.raises(ParseError) as e:
        ir.parse(bad)
    assert "line" in e.value.message


def test_qkv_regroup_permutation_round_trips():
    store = ir.RandomStore("r", seed=3)
    lay = ir.QKVLayout("grouped", 8, 2, 4)
    x = ir.load(store, "qkv", ir.TensorType(ir.f32, (lay.rows, 16), lay))
    there = ir.derive("regroup_qkv", x, to="concat")
    back = ir.derive("regroup_qkv", there, to="grouped")
    assert torch.equal(back.materialize(), x.materialize())
    # grouped row blocks [q0 q1 q2 q3 k0 v0 | q4..q7 k1 v1] -> concat [q0..q7 | k0 k1 | v0 v1]
    xs = x.materialize().view(2, 6, 4, 16)
    c = there.materialize().view(12, 4, 16)
    assert torch.equal(c[0], xs[0, 0]) and torch.equal(c[4], xs[1, 0])
    assert torch.equal(c[8], xs[0, 4]) and torch.equal(c[9], xs[1, 4])
    assert torch.equal(c[10], xs[0, 5]) and torch.equal(c[11], xs[1, 5])


# ------------------------------------------------------------------------------------ structural patterns


def _block_model(wiring, layers=2, H=64, E=4, F=32):
    """A small model whose layers are wired as ``wiring``: sequential, parallel (one norm), parallel2 (two
    norms), shared (x + moe(h) + mlp(h) in one add), shared-nested ((x + moe(h)) + mlp(h))."""
    st = ir.RandomStore("rnd", seed=2)
    lay = ir.QKVLayout("concat", 4, 2, 16)

    def w(key, *shape):
        return ir.load(st, key, ir.TensorType(ir.f32, shape))

    def mlp(h, i, tag):
        return b.node("mlp", h, layer=i, activation="silu", gated=True,
                      params={"gate": w(f"{i}{tag}g", F, H), "up": w(f"{i}{tag}u", F, H),
                              "fc2": w(f"{i}{tag}f", H, F)})

    cfg = ir.ModelConfig(family="x", hidden_size=H, num_layers=layers, vocab_size=128)
    b = ir.Builder(cfg, stores={"rnd": st})
    x = b.node("embedding", b.input_ids, params={"word": w("emb", 128, H)})
    for i in range(layers):
        h = b.node("norm", x, layer=i, params={"weight": w(f"{i}n0", H)})
        a = b.node("attention", h, layer=i, num_heads=4, num_kv_heads=2, head_dim=16,
                   params={"qkv": ir.load(st, f"{i}qkv", ir.TensorType(ir.f32, (lay.rows, H), lay)),
                           "proj": w(f"{i}p", H, H)})
        if wiring.startswith("parallel"):
            h2 = h if wiring == "parallel" else b.node("norm", x, layer=i, params={"weight": w(f"{i}n1", H)})
            x = b.node("add", x, a, mlp(h2, i, "m"), layer=i)
            continue
        x = b.node("add", x, a, layer=i)
        h = b.node("norm", x, layer=i, params={"weight": w(f"{i}n1", H)})
        if wiring == "sequential":
            x = b.node("add", x, mlp(h, i, "m"), layer=i)
            continue
        y = b.node("moe", h, layer=i, num_experts=E, top_k=2, gated=True,
                   params={"router": w(f"{i}r", E, H), "gate": w(f"{i}g", E, F, H), "up": w(f"{i}u", E, F, H),
                           "fc2": w(f"{i}f", E, H, F)})
        s = mlp(h, i, "s")
        x = b.node("add", b.node("add", x, y, layer=i), s, layer=i) if wiring == "shared-nested" else \
            b.node("add", x, y, s, layer=i)
    x = b.node("norm", x, params={"weight": w("nf", H)})
    return b.output(b.node("lm_head", x, params={"weight": w("head", 128, H)}))


@pytest.mark.parametrize("wiring, kind, parallel, norms", [
    ("sequential", "sequential", False, None),
    ("parallel", "parallel", True, 1),
    ("parallel2", "parallel", True, 2),
    ("shared", "moe-shared-expert", False, None),
    ("shared-nested", "moe-shared-expert", False, None),
])
def test_block_patterns(wiring, kind, parallel, norms):
    from mexc.ir import analysis

    m = _block_model(wiring)
    ir.verify(m)
    assert analysis.block_kinds(m) == {0: kind, 1: kind}
    assert analysis.has_parallel_blocks(m) is parallel
    assert analysis.is_parallel_block(m, 1) is parallel
    assert analysis.parallel_block_norms(m, 0)[0] == norms
    match = analysis.match_block(m, 0)
    assert match.attention is m.node("attention", 0) and match.x is m.node("embedding").output
    assert {n.op for n in match.ffn} == ({"moe", "mlp"} if kind == "moe-shared-expert" else {"mlp"})


def test_shared_expert_wiring_is_not_a_falcon_block():
    """x + moe(h) + mlp(h) sums three terms like Falcon's x + attn(n(x)) + mlp(n(x)), but is a MoE with a
    shared expert: no backend may take it for a parallel block (issue 15)."""
    from mexc.backends.base import CompileOptions
    from mexc.driver import get_backend

    m = _block_model("shared")
    for target in ("trtllm", "hf"):
        problems = get_backend(target).check(m, CompileOptions(target=target, build="never"))
        assert problems, f"{target} must refuse a shared expert it cannot express"
        assert all("parallel" not in p and "Falcon" not in p for p in problems), (target, problems)
    assert any("shared expert" in p for p in get_backend("trtllm").check(m, CompileOptions(target="trtllm")))
    # the reference semantics are the wiring's: the same logits as the nested form of the same sum
    assert torch.allclose(run(m, TOKENS), run(_block_model("shared-nested"), TOKENS), atol=1e-6)


def test_an_unmatched_three_term_sum_stays_a_parallel_candidate_with_a_reason():
    """A wiring no pattern matches (here the MLP reads the attention's output) is still flagged, so a Falcon
    backend explains it instead of writing it as a sequential block."""
    from mexc.ir import analysis

    m = _block_model("parallel")
    mlp = m.node("mlp", 0)
    mlp.inputs = (m.node("attention", 0).output,)
    assert analysis.match_block(m, 0) is None and analysis.block_kinds(m)[1] == "parallel"
    assert analysis.is_parallel_block(m, 0) and analysis.has_parallel_blocks(m)
    why = "attention and MLP must read a norm of the block input"
    assert analysis.parallel_block_norms(m, 0) == (None, why)
