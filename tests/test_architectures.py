"""Every tiny family x mode (TL 4 bridge raw / compatibility mode, or TL 3) x capability is
exact against the Hugging Face model itself, or refused with an ArchitectureError naming the
architecture; see tests/architectures.py for the cells and their independent references."""

import functools

import pytest
import torch

from architectures import CAPABILITIES, CASES, case, check_nonvacuous, run_cell
from embedwalk import adapt
from embedwalk.errors import ArchitectureError
from embedwalk.testing import installed_generation
from tolerance import dot_tol, logit_tol

GEN = installed_generation()


@pytest.fixture(scope="session")
def store_tmp(tmp_path_factory):
    return str(tmp_path_factory.mktemp("arch-store"))


@pytest.mark.parametrize("family,mode", CASES, ids=[f"{f}-{m}" for f, m in CASES])
def test_not_vacuous(family, mode):
    check_nonvacuous(case(family, mode))


@pytest.mark.parametrize("capability", list(CAPABILITIES))
@pytest.mark.parametrize("family,mode", CASES, ids=[f"{f}-{m}" for f, m in CASES])
def test_cell(family, mode, capability, store_tmp):
    run_cell(family, mode, capability, store_tmp)


def _first(family):
    return case(family, CASES[[f for f, _ in CASES].index(family)][1])


def test_readout_applies_the_output_transform():
    """Gemma-2's soft-cap (5) changes the logits: without it the readout would be off."""
    c = _first("gemma2")
    a = adapt(c.model)
    x = torch.randn(3, a.d_model) * 30
    assert float((a.readout(x) - a.readout(x, transform=False)).abs().max()) > 1.0
    assert a.output_scale is None  # a soft-cap is not linear


def test_self_check_refuses_a_readout_that_misses_the_transform(monkeypatch):
    from embedwalk.adapter import ModelAdapter

    c = _first("gemma2")
    monkeypatch.setattr(ModelAdapter, "output_transform", lambda self, logits: logits)
    with pytest.raises(ArchitectureError, match=r"self-check failed.*Gemma2.*soft-capped or rescaled"):
        ModelAdapter(c.model)


@pytest.mark.skipif(GEN != "bridge", reason="Granite and OPT's flattened hooks are TL 4 bridge facts")
def test_derived_and_flattened_hooks_are_named():
    granite = adapt(_first("granite").model)
    assert granite.source("blocks.0.hook_attn_out").how == "derived: resid_mid - resid_pre"
    assert granite.blocks[0].residual_scale == pytest.approx(0.5)
    opt = adapt(_first("opt").model)
    assert opt.source("blocks.0.hook_resid_mid").flat
    xglm = adapt(_first("xglm").model)
    assert xglm.has_pos_embed and not xglm.source("hook_pos_embed").direct


def test_writer_on_a_derived_hook_is_refused():
    from embedwalk.run import Writer, run

    class Noop(Writer):
        def hook_points(self, adapter):
            return ["blocks.0.hook_attn_out"]

        def write(self, name, value, ctx):
            return value

    fam = "granite" if GEN == "bridge" else None
    if fam is None:
        pytest.skip("no tiny TL 3 model with a derived attn_out")
    with pytest.raises(ArchitectureError, match="does not fire as itself"):
        run(_first(fam).model, torch.tensor([[1, 5, 6]]), writers=[Noop()])


def test_parallel_mid_refusal_says_why():
    c = _first("neox")
    with pytest.raises(ArchitectureError, match="parallel"):
        adapt(c.model).readout_points(mid=True)


def test_adapter_reprobes_when_the_mode_changes():
    if GEN != "bridge":
        pytest.skip("compatibility mode is a TL 4 bridge mode")
    from embedwalk.testing import tiny_model

    model = tiny_model("gpt2", GEN)
    raw = adapt(model)
    assert adapt(model) is raw and not raw.compat
    model.enable_compatibility_mode()
    compat = adapt(model)
    assert compat is not raw and compat.compat and compat.readout_gap <= 2e-5


def _tiny(config: str, cls: str, **kw):
    """A tiny stressed HF model (2 layers, d_model 64, vocab 200) wrapped as a bridge, and a pristine copy."""
    import copy

    import transformers

    from embedwalk.models import wrap
    from embedwalk.testing import _stress, tiny_tokenizer

    cfg = getattr(transformers, config)(bos_token_id=1, eos_token_id=1, pad_token_id=0, initializer_range=0.2,
                                        vocab_size=200, **kw)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = getattr(transformers, cls)(cfg)
    _stress(hf, 0)
    hf.eval()
    model = wrap(copy.deepcopy(hf), tiny_tokenizer(vocab=200, pad_token="<unk>"), generation="bridge", name="tiny-x")
    return model, hf


def _tiny_opt(**overrides):
    kw = dict(hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4, max_position_embeddings=128,
              word_embed_proj_dim=64, do_layer_norm_before=True)
    return _tiny("OPTConfig", "OPTForCausalLM", **{**kw, **overrides})


@functools.lru_cache(maxsize=None)
def _tiny_bloom_post_ln():
    return _tiny("BloomConfig", "BloomForCausalLM", hidden_size=64, n_layer=2, n_head=8,
                 apply_residual_connection_post_layernorm=True)


@functools.lru_cache(maxsize=None)
def _opt_project_out():
    return _tiny_opt(word_embed_proj_dim=32)


@pytest.mark.skipif(GEN != "bridge", reason="TL 4 bridge: OPT's project_in/project_out mapping")
def test_opt_project_out_readout_is_exact():
    """word_embed_proj_dim 32 != hidden 64: final norm -> project_out -> unembed, against HF."""
    model, hf = _opt_project_out()
    a = adapt(model)
    ids = torch.tensor([[1, 5, 17, 99, 3, 150, 42, 7]])
    with torch.no_grad():
        out = hf(ids, output_hidden_states=True)
        dec = hf.model.decoder
        x = out.hidden_states[1]  # resid after block 0: a point where a missing project_out would show
        want = hf.lm_head(dec.project_out(dec.final_layer_norm(x)))
        got = a.readout(x)
        tol = logit_tol(a, x)  # two float32 computations of the same readout (tests/tolerance.py)
        assert float((got - want).abs().max()) <= tol
        # the folded unembedding and embedding stay in the residual basis (W_U folded with
        # project_out: one more length-32 product, rounded once more)
        normed = dec.final_layer_norm(x)
        assert float((normed @ a.W_U + (a.b_U if a.b_U is not None else 0) - want).abs().max()) <= 2 * tol
        emb_in = dec.embed_tokens(ids)
        emb = dec.project_in(emb_in)
        W_in = dec.project_in.weight
        emb_tol = dot_tol((emb_in.abs() @ W_in.abs().T).double(), W_in.shape[1])
        assert ((a.W_E[ids] - emb).abs().double() <= emb_tol).all()
    assert a.source("hook_embed").how.startswith("derived")


@pytest.mark.skipif(GEN != "bridge", reason="TL 4 bridge: post-LN OPT fails inside TransformerLens's forward")
def test_a_failing_model_forward_becomes_an_architecture_error():
    model, _ = _tiny_opt(do_layer_norm_before=False)
    with pytest.raises(ArchitectureError, match=r"OPTForCausalLM.*raw.*model's own forward pass failed") as err:
        adapt(model)
    assert err.value.__cause__ is not None


@pytest.mark.skipif(GEN != "bridge", reason="TL 4 bridge: BLOOM's post-layernorm residual fires no exact attn_out")
def test_heads_refusal_names_the_missing_hook():
    from embedwalk.lenses.decompose import decompose

    model, _ = _tiny_bloom_post_ln()
    spec = adapt(model).blocks[0]
    assert not spec.heads_exact and "inf" not in spec.heads_why and "hook_attn_out" in spec.heads_why
    with pytest.raises(ArchitectureError, match=r"blocks\.0\.hook_attn_out is unavailable"):
        decompose(model, torch.tensor([[1, 5, 17, 99]]), layer=1, position=-1, token=5)


@pytest.mark.skipif(GEN != "bridge", reason="the known-gap table covers TL 4 bridges (TL 3 keeps no HF config)")
def test_known_tl_conversion_gap_is_refused_with_an_escape_hatch():
    """BLOOM with apply_residual_connection_post_layernorm in compatibility mode: TL's model is
    itself off the HF model, which the self-check (against TL's output) cannot see."""
    model, hf = _tiny("BloomConfig", "BloomForCausalLM", hidden_size=64, n_layer=2, n_head=8,
                      apply_residual_connection_post_layernorm=True)
    model.enable_compatibility_mode()
    with pytest.raises(ArchitectureError, match=r"BloomForCausalLM.*apply_residual_connection_post_layernorm.*"
                                                r"Use raw mode.*accept_known_tl_gaps=True"):
        adapt(model)
    a = adapt(model, accept_known_tl_gaps=True)
    assert adapt(model) is a and a.known_tl_gap[0] == "BloomForCausalLM"
    # the row is real: TL's compatibility-mode model misses HF's own log-probs
    ids = torch.tensor([[1, 5, 17, 99, 3, 150, 42, 7]])
    with torch.no_grad():
        gap = (model(ids).double().log_softmax(-1) - hf(ids).logits.double().log_softmax(-1)).abs().max()
    assert float(gap) > 0.1
    raw, _ = _tiny_bloom_post_ln()
    assert adapt(raw).known_tl_gap is None  # raw mode is exact and served
