"""One answer to "which keys does query q of layer l reach" (ModelAdapter.reach), checked
against the Hugging Face model's own attention, and every uniform baseline, key count and
self-attention expectation built on it (issue 18, items 2 and 6)."""

import math

import pytest
import torch

import embedwalk as ew
from embedwalk.association import UniformSwap, association_bias, downstream, sweep
from embedwalk.errors import ArchitectureError, EmbedwalkError
from embedwalk.priority.heads import graphs_from_tokens
from embedwalk.priority.model import HeadPriorityReader, _score_mask
from embedwalk.testing import HOOKED_FAMILIES, installed_generation, tiny_hf, tiny_model

GENERATION = installed_generation()
SLIDING = [f for f in ("mistral", "gemma2", "gemma3", "gpt_neo", "starcoder2")
           if GENERATION == "bridge" or f in HOOKED_FAMILIES]
EPS32 = torch.finfo(torch.float32).eps
EPS64 = torch.finfo(torch.float64).eps

# Repeated words, longer than the tiny models' window of 4, so that the window matters.
LONG = "w5 w6 w7 w5 w8 w6 w9 w5 w7 w10 w6 w5 w8 w9 w7 w5"
TEXTS = [LONG, "w5 w6 w7 w5 w8 w6", "w9"]


@pytest.fixture(scope="module", params=["mistral", "gpt_neo"])
def sliding(request):
    """A tiny model with a window of 4 on every layer (Mistral) or on its local layer (GPT-Neo)."""
    model = tiny_model(request.param, GENERATION)
    a = ew.adapt(model)
    assert any(a.attention_window(l) for l in range(a.n_layers))
    return model


def _hand_count(mask: torch.Tensor, window) -> torch.Tensor:
    """Reachable keys of each query, counted by hand: the real keys from the row's first real
    token up to the query, at most ``window`` of them (positions of the padded sequence)."""
    out = torch.zeros(mask.shape, dtype=torch.long)
    for b in range(mask.shape[0]):
        for q in range(mask.shape[1]):
            keys = [k for k in range(q + 1) if mask[b, k] and (window is None or q - k < window)]
            out[b, q] = len(keys)
    return out


@pytest.mark.parametrize("family", SLIDING)
@pytest.mark.parametrize("side", ["left", "right"])
def test_reach_is_where_the_hugging_face_model_attends(family, side):
    """Eager attention weights of the pristine HF model are nonzero exactly where reach is True
    (every real query row), for either padding side, on windows smaller than the sequence."""
    model = tiny_model(family, GENERATION, padding_side=side)
    a = ew.adapt(model)
    tokens, mask = ew.tokenize(a, TEXTS, padding_side=side)
    hf = tiny_hf(family)  # a fresh copy of the same weights, never booted
    with torch.no_grad():
        out = hf(input_ids=tokens, attention_mask=mask.long(), output_attentions=True)
    windows = [a.attention_window(l) for l in range(a.n_layers)]
    assert any(w is not None and w < mask.sum(-1).max() for w in windows)
    for layer, weights in enumerate(out.attentions):
        reach = a.reach(layer, mask)
        attends = weights.abs().amax(1) > 0  # [batch, q, k], any head
        rows = mask[:, :, None].expand_as(attends)
        assert torch.equal(attends[rows], reach[rows]), (family, side, layer)
        assert torch.equal(reach.sum(-1)[mask], _hand_count(mask, windows[layer])[mask])


def test_reach_refuses_chunked_attention_and_sinks():
    """Llama-4 chunked layers and GPT-OSS attention sinks are refused by name, not guessed."""
    if GENERATION != "bridge":
        pytest.skip("TL 3 has neither Llama-4 nor GPT-OSS")
    import transformers

    from embedwalk.models import wrap
    from embedwalk.testing import tiny_tokenizer

    common = dict(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=200, max_position_embeddings=128,
                  bos_token_id=1, eos_token_id=1, pad_token_id=0)
    cases = [
        ("Llama4TextConfig", "Llama4ForCausalLM", dict(intermediate_size_mlp=128, num_local_experts=2,
                                                        attention_chunk_size=4, no_rope_layers=[0, 1]), "chunked"),
        ("GptOssConfig", "GptOssForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=4),
         "attention sinks"),
    ]
    mask = torch.ones(1, 6, dtype=torch.bool)
    for config_name, model_name, extra, why in cases:
        torch.manual_seed(0)
        config = getattr(transformers, config_name)(architectures=[model_name], **common, **extra)
        config._attn_implementation = "eager"
        hf = getattr(transformers, model_name)(config).eval()
        a = ew.adapt(wrap(hf, tiny_tokenizer(pad_token="<unk>"), name=f"tiny-{model_name}"))
        layers = [l for l in range(a.n_layers) if "chunked" not in why or config.layer_types[l] == "chunked_attention"]
        assert layers
        for layer in layers:
            with pytest.raises(ArchitectureError, match=why):
                a.reach(layer, mask)
        with pytest.raises(ArchitectureError, match=why):
            association_bias(a.model, "w5 w6 w7")


@pytest.mark.parametrize("exclude_self", [False, True])
def test_uniform_z_is_the_uniform_pattern_times_the_values(exclude_self):
    """uniform_z (running sums on interval-shaped reach, the pattern product otherwise) equals
    uniform_pattern applied to the values in float64, for causal, windowed, left/right padded
    and arbitrary reach."""
    from embedwalk.association.swap import _interval, uniform_pattern, uniform_z

    torch.manual_seed(0)
    b, p, kv, h, d = 3, 11, 2, 4, 8
    mask = torch.ones(b, p, dtype=torch.bool)
    mask[1, :4] = False  # left padding
    mask[2, 7:] = False  # right padding
    idx = torch.arange(p)
    gap = idx[:, None] - idx[None, :]
    reaches = {"causal": (gap >= 0)[None] & mask[:, None, :],
               "window 3": ((gap >= 0) & (gap < 3))[None] & mask[:, None, :],
               "arbitrary": torch.rand(b, p, p) < 0.4}
    v = torch.randn(b, p, kv, d)
    for name, reach in reaches.items():
        assert (_interval(reach) is None) == (name == "arbitrary")
        z = uniform_z(v, reach, h, kv, exclude_self=exclude_self).double()
        want = torch.einsum("bqk,bkhd->bqhd", uniform_pattern(reach, exclude_self=exclude_self).double(),
                            v.double()).repeat_interleave(h // kv, dim=2)
        # float32 output of a mean of at most p terms: rounding of each value and of the result
        tol = 2 * p * EPS32 * float(v.abs().max())
        assert float((z - want).abs().max()) <= tol, name


def _uniform_priority(model, texts):
    """head_priority's reader on patterns written uniform over the reached keys."""
    a = ew.adapt(model)
    tokens, mask = ew.tokenize(a, texts, padding_side="left")
    graphs = graphs_from_tokens(tokens, _score_mask(a, tokens, mask, True), vocab_size=a.d_vocab)
    (res,) = ew.run(model, tokens, attention_mask=mask, readers=[HeadPriorityReader(graphs)],
                    writers=[UniformSwap(method="pattern")])
    return res


def test_head_priority_scores_a_uniform_head_one(sliding):
    """A head attending uniformly over the keys its layer reaches scores ratio 1 on every layer,
    the sliding ones included (the whole-prefix baseline gave ~0.9 there)."""
    res = _uniform_priority(sliding, TEXTS)
    n = res.scores["n_positions"]
    assert (n > 0).all()
    # Each row of the written pattern holds one float32 value, so renormalising it in float64
    # gives 1/m to float64 rounding; the means then sum n terms of magnitude <= 1.
    tol = 4 * EPS64 * float(n.max())
    assert float((res.scores["ratio"] - 1).abs().max()) <= tol, res.scores["ratio"]
    assert float(res.scores["difference"].abs().max()) <= tol


def test_association_bias_uniform_head_and_counts(sliding):
    """Under a uniform swap, every head is at distance 0 from uniform aggregation and its self
    attention equals the uniform expectation 1/m, m the keys its layer reaches; the counts are
    those of a hand count."""
    from embedwalk.association.measure import AssociationReader
    from embedwalk.association.probes import value_offset

    a = ew.adapt(sliding)
    tokens, mask = ew.tokenize(a, TEXTS, padding_side="left")
    seen = {}

    class Grab(ew.Reader):
        def hook_points(self, adapter):
            return [adapter.hook(k, l) for l in range(adapter.n_layers) for k in ("v", "z")]

        def read(self, name, value, ctx):
            seen[name] = value.reshape(*value.shape[:2], -1, a.d_head).double()

    res, _ = ew.run(sliding, tokens, attention_mask=mask, readers=[AssociationReader(), Grab()],
                    writers=[UniformSwap(method="pattern")])
    lengths = [len(a.to_tokens(t)) for t in TEXTS]
    assert res.n_single_key.tolist() == [len(TEXTS)] * a.n_layers  # each prompt's first real token
    assert res.n_queries.tolist() == [sum(lengths) - len(TEXTS)] * a.n_layers
    offset = value_offset(a).double().repeat_interleave(a.n_heads // a.n_kv_heads, dim=1)
    for layer in range(a.n_layers):
        m = _hand_count(mask, a.attention_window(layer)).double()
        counted = mask & (m > 1)
        want = float((1.0 / m[counted]).mean())
        # float32 pattern entries 1/m (relative error eps32/2), averaged in float64
        assert abs(float(res.self_uniform[layer]) - want) <= EPS32 * want
        assert float((res.self_attention[layer] - want).abs().max()) <= EPS32 * want
        assert float(res.self_bias[layer].abs().max()) <= 2 * EPS32 * want
        # z (the model's) and z_uniform (embedwalk's) are float32 sums of the same m products
        # 1/m * v_k; each is within m * eps32 * max|v| of the exact mean (per element), so
        # their distance is at most twice that, relative to the smallest |z - c| counted.
        v, z = seen[a.hook("v", layer)], seen[a.hook("z", layer)]
        z0 = (z - offset[layer]).norm(dim=-1)[counted].min()
        bound = 2 * float(m.max()) * EPS32 * math.sqrt(a.d_head) * float(v.abs().max()) / float(z0)
        assert float(res.distance[layer].max()) <= bound, (layer, res.distance[layer], bound)
        assert float(res.cosine[layer].min()) >= 1 - bound


def test_association_bias_excludes_single_key_queries(tiny_arch):
    """`association_bias(m, ["w5"])`: BOS + one word; the BOS query reaches one key and is
    excluded, so the means are over 1 query, not 2."""
    a = ew.adapt(tiny_arch)
    assert len(a.to_tokens("w5")) == 2
    res = association_bias(tiny_arch, ["w5"])
    assert res.n_queries.tolist() == [1] * a.n_layers and res.n_single_key.tolist() == [1] * a.n_layers
    assert "over 1 query positions (1 more reach a single key" in str(res)
    assert torch.allclose(res.self_uniform.double(), torch.full((a.n_layers,), 0.5, dtype=torch.float64))
    one_token = torch.tensor([[int(a.to_tokens("w5")[-1])]])
    with pytest.raises(EmbedwalkError, match="at least two tokens"):
        association_bias(tiny_arch, one_token)


def test_association_bias_states_the_formula_it_computes(tiny_arch):
    res = association_bias(tiny_arch, ["w5 w6 w7"])
    fig = res.plot()
    assert "‖z − c‖" in fig.axes[0].get_title()
    assert "‖z − z_uniform‖/‖z − c‖" in str(res)


def test_sweep_and_downstream_count_predicted_positions(tiny_arch):
    """A padded batch: the loss is a mean over positions with a next real token (n − 1 per
    prompt of n tokens), KL, top-1 and cosine over all real positions; counted by hand."""
    a = ew.adapt(tiny_arch)
    texts = ["w5 w6 w7 w8 w9", "w9", "w3 w4 w5"]
    lengths = [len(a.to_tokens(t)) for t in texts]
    n_predicted, n_positions = sum(n - 1 for n in lengths), sum(lengths)
    eff = downstream(tiny_arch, texts, [0], padding_side="left")
    assert (eff.n_predicted, eff.n_positions) == (n_predicted, n_positions)
    assert f"over {n_predicted} predicted positions" in str(eff)
    assert f"over {n_positions} token positions" in str(eff)
    table = sweep(tiny_arch, texts, units=["all", "layer"], progress=False).table
    assert (table.n_predicted == n_predicted).all() and (table.n_positions == n_positions).all()
    assert "n_tokens" not in table.columns
    assert math.isfinite(eff.loss_swapped)
