"""Tiny random models built offline, for tests, tutorials and quick experiments.

``tiny_hf(family)`` builds a randomly initialised Hugging Face causal LM of one of
:data:`FAMILIES` (2 layers, d_model 64, 4 heads, vocab 200, eager attention) and
``tiny_model(family, generation)`` serves it as a TL 4 ``TransformerBridge`` or a TL 2/3
``HookedTransformer`` holding the very same weights. All use a word-level tokenizer
("w2 w3 ..."; id 1 is BOS/EOS).

Every family except the two historical ones ("gpt2", "llama", kept as they were so that
existing outputs do not move) is *stressed* by default: ``initializer_range`` 0.2 so that
attention is far from uniform, and random norm weights and biases and random linear biases
(Hugging Face initialises them to 1 and 0, which hides norm and bias bugs). Pass
``stress=True`` to stress "gpt2" and "llama" too (the architecture test matrix does).
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch

from embedwalk.errors import EmbedwalkError
from embedwalk.models import cache_dir, installed_generation, wrap

__all__ = [
    "tiny_tokenizer", "tiny_hf", "tiny_model", "installed_generation", "VOCAB", "FAMILIES",
    "HOOKED_FAMILIES", "HOOKED_MISSING", "tiny_hooked", "MODES", "matrix_modes", "matrix_case",
]

VOCAB = 200
UNK, BOS = 0, 1  # <unk> doubles as the padding id for every family but GPT-2


@lru_cache(maxsize=None)
def _tokenizer_dir(vocab: int, pad_token: str = "<|endoftext|>") -> Path:
    import tokenizers
    from transformers import PreTrainedTokenizerFast

    # One folder per padding id: TransformerLens re-loads tokenizers from their folder, which
    # would drop a padding token set only in memory.
    path = cache_dir() / (f"tiny-tokenizer-{vocab}" + ("" if pad_token == "<|endoftext|>" else "-pad-unk"))
    if not (path / "tokenizer_config.json").exists():
        words = {"<unk>": 0, "<|endoftext|>": 1, **{f"w{i}": i for i in range(2, vocab)}}
        tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=words, unk_token="<unk>"))
        tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
        tmp = path.with_name(f"{path.name}.partial-{os.getpid()}")
        PreTrainedTokenizerFast(
            tokenizer_object=tok, unk_token="<unk>", bos_token="<|endoftext|>",
            eos_token="<|endoftext|>", pad_token=pad_token,
        ).save_pretrained(tmp)
        try:
            tmp.rename(path)
        except OSError:  # another process won the race; its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def tiny_tokenizer(vocab: int = VOCAB, padding_side: str = "right", *, pad_token: str = "<|endoftext|>"):
    """A word-level tokenizer: "w2 w3 w4" -> [2, 3, 4]; BOS/EOS is id 1, PAD is ``pad_token``
    (id 1 by default; the families other than GPT-2 pad with "<unk>", id 0)."""
    from transformers import AutoTokenizer

    if pad_token not in ("<|endoftext|>", "<unk>"):
        raise EmbedwalkError(f"pad_token must be '<|endoftext|>' or '<unk>', got {pad_token!r}")
    tok = AutoTokenizer.from_pretrained(_tokenizer_dir(vocab, pad_token))
    tok.padding_side = padding_side
    return tok


def _pad_token(family: str) -> str:
    return "<|endoftext|>" if family == "gpt2" else "<unk>"


# ---------------------------------------------------------------------------- families
# Each builder returns (config class name, model class name, config kwargs) for d_model D,
# L layers and vocabulary V; ``ids`` are the shared special ids. A strong final soft-cap,
# small sliding windows, local layers, logit scales and residual multipliers are set on
# purpose: each is a place where a readout can silently differ from the model's.
def _ids(pad=UNK):
    return dict(bos_token_id=BOS, eos_token_id=BOS, pad_token_id=pad)


def _decoder(D, L, V, heads=4, kv=4, **extra):
    """The kwargs shared by the Llama-like configs."""
    return dict(hidden_size=D, intermediate_size=2 * D, num_hidden_layers=L, num_attention_heads=heads,
                num_key_value_heads=kv, vocab_size=V, max_position_embeddings=128, **_ids(), **extra)


_FAMILY_SPECS = {
    "gpt2": lambda D, L, V: ("GPT2Config", "GPT2LMHeadModel", dict(
        n_layer=L, n_embd=D, n_head=4, vocab_size=V, n_positions=128, bos_token_id=BOS, eos_token_id=BOS)),
    "neox": lambda D, L, V: ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(
        hidden_size=D, num_hidden_layers=L, num_attention_heads=4, intermediate_size=4 * D, vocab_size=V,
        max_position_embeddings=128, use_parallel_residual=True, **_ids())),
    "gptj": lambda D, L, V: ("GPTJConfig", "GPTJForCausalLM", dict(
        n_embd=D, n_layer=L, n_head=4, rotary_dim=8, n_positions=128, vocab_size=V, **_ids())),
    "phi": lambda D, L, V: ("PhiConfig", "PhiForCausalLM", dict(
        hidden_size=D, intermediate_size=4 * D, num_hidden_layers=L, num_attention_heads=4, vocab_size=V,
        max_position_embeddings=128, **_ids())),
    "phi3": lambda D, L, V: ("Phi3Config", "Phi3ForCausalLM", _decoder(D, L, V)),
    "falcon": lambda D, L, V: ("FalconConfig", "FalconForCausalLM", dict(
        hidden_size=D, num_hidden_layers=L, num_attention_heads=4, vocab_size=V, parallel_attn=True,
        new_decoder_architecture=False, multi_query=True, bias=False, alibi=False, **_ids())),
    "opt": lambda D, L, V: ("OPTConfig", "OPTForCausalLM", dict(
        hidden_size=D, num_hidden_layers=L, ffn_dim=4 * D, num_attention_heads=4, vocab_size=V,
        max_position_embeddings=128, word_embed_proj_dim=D, do_layer_norm_before=True, **_ids())),
    "gpt_neo": lambda D, L, V: ("GPTNeoConfig", "GPTNeoForCausalLM", dict(
        hidden_size=D, num_layers=L, num_heads=4, vocab_size=V, max_position_embeddings=128,
        attention_types=[[["global", "local"], L // 2]], window_size=4, **_ids())),
    "bloom": lambda D, L, V: ("BloomConfig", "BloomForCausalLM", dict(
        hidden_size=D, n_layer=L, n_head=4, vocab_size=V, **_ids())),
    "llama": lambda D, L, V: ("LlamaConfig", "LlamaForCausalLM", _decoder(D, L, V, kv=2)),
    "mistral": lambda D, L, V: ("MistralConfig", "MistralForCausalLM", _decoder(D, L, V, kv=2, sliding_window=4)),
    "mixtral": lambda D, L, V: ("MixtralConfig", "MixtralForCausalLM", _decoder(
        D, L, V, kv=2, num_local_experts=4, num_experts_per_tok=2, sliding_window=None)),
    "qwen2": lambda D, L, V: ("Qwen2Config", "Qwen2ForCausalLM", _decoder(D, L, V, kv=2)),
    "qwen3": lambda D, L, V: ("Qwen3Config", "Qwen3ForCausalLM", _decoder(D, L, V, kv=2, head_dim=D // 4)),
    "gemma": lambda D, L, V: ("GemmaConfig", "GemmaForCausalLM", _decoder(D, L, V, kv=2, head_dim=D // 4)),
    "gemma2": lambda D, L, V: ("Gemma2Config", "Gemma2ForCausalLM", _decoder(
        D, L, V, kv=2, head_dim=D // 4, final_logit_softcapping=5.0, attn_logit_softcapping=50.0,
        sliding_window=4, query_pre_attn_scalar=D // 4)),
    "gemma3": lambda D, L, V: ("Gemma3TextConfig", "Gemma3ForCausalLM", _decoder(
        D, L, V, kv=2, head_dim=D // 4, sliding_window=4, query_pre_attn_scalar=D // 4,
        layer_types=(["sliding_attention", "full_attention"] * L)[:L])),
    "olmo": lambda D, L, V: ("OlmoConfig", "OlmoForCausalLM", _decoder(D, L, V)),
    "olmo2": lambda D, L, V: ("Olmo2Config", "Olmo2ForCausalLM", _decoder(D, L, V)),
    "granite": lambda D, L, V: ("GraniteConfig", "GraniteForCausalLM", _decoder(
        D, L, V, kv=2, logits_scaling=4.0, residual_multiplier=0.5, embedding_multiplier=3.0,
        attention_multiplier=0.3)),
    "xglm": lambda D, L, V: ("XGLMConfig", "XGLMForCausalLM", dict(
        d_model=D, num_layers=L, attention_heads=4, ffn_dim=4 * D, vocab_size=V, max_position_embeddings=128,
        scale_embedding=True, decoder_start_token_id=BOS, **_ids())),
    "stablelm": lambda D, L, V: ("StableLmConfig", "StableLmForCausalLM", _decoder(D, L, V)),
    "starcoder2": lambda D, L, V: ("Starcoder2Config", "Starcoder2ForCausalLM", _decoder(
        D, L, V, kv=2, sliding_window=4, use_bias=True)),
    "cohere": lambda D, L, V: ("CohereConfig", "CohereForCausalLM", _decoder(D, L, V, kv=2, logit_scale=0.25)),
}

FAMILIES: tuple = tuple(_FAMILY_SPECS)
_LEGACY = ("gpt2", "llama")  # built exactly as before the matrix existed unless stress=True


def _stress(model: torch.nn.Module, seed: int) -> None:
    """Random norm weights/biases and random linear biases, drawn from a private generator."""
    gen = torch.Generator().manual_seed(seed + 7919)
    with torch.no_grad():
        for module in model.modules():
            kind = type(module).__name__.lower()
            is_norm = "norm" in kind
            for name, p in module.named_parameters(recurse=False):
                if is_norm and name == "weight":
                    p.add_(0.4 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
                elif name == "bias" and (is_norm or isinstance(module, torch.nn.Linear) or "conv1d" in kind):
                    p.add_(0.2 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


@lru_cache(maxsize=None)
def _pristine(family, seed, vocab, layers, d_model, dtype, stress):
    import transformers

    if family not in _FAMILY_SPECS:
        raise EmbedwalkError(f"family must be one of {FAMILIES}, got {family!r}")
    config_name, model_name, kwargs = _FAMILY_SPECS[family](d_model, layers, vocab)
    if stress:
        kwargs["initializer_range"] = 0.2
        if family == "gpt2" or family == "gptj":
            kwargs["tie_word_embeddings"] = False  # an untied, large-scale unembed as in real models
    config = getattr(transformers, config_name)(**kwargs)
    config._attn_implementation = "eager"
    config.architectures = [model_name]  # TransformerLens picks its adapter from this
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config)
    if stress:
        _stress(model, seed)
    return model.to(dtype).eval()


def tiny_hf(family: str = "gpt2", *, seed: int = 0, vocab: int = VOCAB, layers: int = 2, d_model: int = 64,
            dtype=torch.float32, stress: Optional[bool] = None):
    """A randomly initialised Hugging Face causal LM of ``family`` (one of :data:`FAMILIES`).

    Built once per process per argument set; each call returns a fresh deep copy, so booting
    it (which wraps modules in place) never touches the cached original. ``stress`` defaults
    to True for every family but "gpt2" and "llama" (see the module docstring).
    """
    if stress is None:
        stress = family not in _LEGACY
    return copy.deepcopy(_pristine(family, seed, vocab, layers, d_model, dtype, bool(stress)))


# ---------------------------------------------------------------------------- TL 3.x
# TL 3.9 names, per family, of an official model whose converter fits; families it keys by
# the config's architecture need none (the tiny config is read from a local folder).
_HOOKED_BY_NAME = {
    "gemma": "google/gemma-2b", "gemma2": "google/gemma-2-2b", "gemma3": "google/gemma-3-270m",
    "olmo": "allenai/OLMo-1B-hf", "olmo2": "allenai/OLMo-2-0425-1B",
}
#: Families TL 3.x ``HookedTransformer`` can hold (checked against the HF logits in tests).
HOOKED_FAMILIES: tuple = (
    "gpt2", "neox", "gptj", "phi", "phi3", "opt", "gpt_neo", "bloom", "llama", "mistral", "mixtral",
    "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "olmo",
)
#: Why a family is not in HOOKED_FAMILIES (measured with TL 3.9.0, transformers 5.24).
HOOKED_MISSING = {
    "falcon": "TL 3 has no Falcon converter", "granite": "TL 3 has no Granite converter",
    "xglm": "TL 3 has no XGLM converter", "stablelm": "TL 3 has no StableLM converter",
    "starcoder2": "TL 3 has no StarCoder2 converter", "cohere": "TL 3 has no Cohere converter",
    "olmo2": "TL 3.9's OLMo-2 conversion does not reproduce the HF logits (3.3 off on the tiny model)",
}


def _hooked_overrides(hf_config) -> dict:
    """Sizes of the tiny model, written over a name-keyed TL 3 config of the full-size model."""
    c = hf_config
    d_head = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    out = dict(
        d_model=c.hidden_size, d_head=d_head, n_heads=c.num_attention_heads, d_mlp=c.intermediate_size,
        n_layers=c.num_hidden_layers, n_ctx=c.max_position_embeddings, d_vocab=c.vocab_size,
        d_vocab_out=c.vocab_size, n_key_value_heads=c.num_key_value_heads,
        eps=getattr(c, "rms_norm_eps", None) or 1e-5,
    )
    act = getattr(c, "hidden_activation", None) or getattr(c, "hidden_act", None)
    if act:
        out["act_fn"] = act
    if getattr(c, "sliding_window", None):
        out["window_size"] = c.sliding_window
    if getattr(c, "layer_types", None):
        out["attn_types"] = ["local" if t == "sliding_attention" else "global" for t in c.layer_types]
    for src, dst in (("final_logit_softcapping", "output_logits_soft_cap"), ("attn_logit_softcapping", "attn_scores_soft_cap")):
        if hasattr(c, src):
            out[dst] = getattr(c, src) or -1.0
    if getattr(c, "query_pre_attn_scalar", None):
        out["attn_scale"] = float(c.query_pre_attn_scalar) ** 0.5
    out["rotary_dim"] = d_head
    return out


@contextmanager
def _tl3_offline(folder: str, hf_config, official: Optional[str]):
    """Let TL 3's from_pretrained take a local tiny config under a path or official name."""
    from transformer_lens import loading_from_pretrained as loading

    saved = loading.get_official_model_name, loading.AutoConfig.from_pretrained, loading.convert_hf_model_config
    original_convert = loading.convert_hf_model_config

    def convert(name, **kwargs):
        if official is None:
            return original_convert(folder, **kwargs)
        cfg = original_convert(official, **kwargs)
        over = _hooked_overrides(hf_config)
        if "n_key_value_heads" not in cfg and over["n_key_value_heads"] == over["n_heads"]:
            del over["n_key_value_heads"]  # a multi-head config keeps TL's non-GQA attention
        cfg.update(over)
        return cfg

    loading.get_official_model_name = lambda name: name if name == official else folder
    loading.AutoConfig.from_pretrained = lambda *a, **k: hf_config
    loading.convert_hf_model_config = convert
    try:
        yield
    finally:
        loading.get_official_model_name, loading.AutoConfig.from_pretrained, loading.convert_hf_model_config = saved


def tiny_hooked(hf_model, tokenizer, family: str, *, device: str = "cpu", processed: bool = False):
    """A TL 2/3 ``HookedTransformer`` holding ``hf_model``'s weights, built offline.

    ``processed=False`` loads the weights as they are (no LayerNorm folding, centring or
    value-bias folding), so logits equal the HF model's; ``True`` applies TL's defaults.
    """
    from embedwalk.models import hooked_from_hf

    if family in _LEGACY and not processed:
        return hooked_from_hf(hf_model, tokenizer, device=device)
    from transformer_lens import HookedTransformer

    if family not in HOOKED_FAMILIES:
        raise EmbedwalkError(f"TL 3 has no converter for family {family!r}; choose one of {HOOKED_FAMILIES}")
    # Config fields TL 3 reads under names transformers 5 no longer sets at the top level.
    if family == "phi" and not hasattr(hf_model.config, "partial_rotary_factor"):
        hf_model.config.partial_rotary_factor = hf_model.config.rope_parameters["partial_rotary_factor"]
    if family == "gpt2" and not hasattr(hf_model.config, "n_ctx"):
        hf_model.config.n_ctx = hf_model.config.n_positions
    flags = {} if processed else dict(fold_ln=False, center_writing_weights=False, center_unembed=False,
                                      fold_value_biases=False, refactor_factored_attn_matrices=False)
    # A folder whose path holds no family word: TL 3 switches on substrings of the name.
    with tempfile.TemporaryDirectory(prefix="tinymodel-") as folder:
        hf_model.config.save_pretrained(folder)
        with _tl3_offline(folder, hf_model.config, _HOOKED_BY_NAME.get(family)):
            model = HookedTransformer.from_pretrained(
                folder, hf_model=hf_model, tokenizer=tokenizer, device=device, dtype=hf_model.dtype, **flags)
    return model.eval()


def tiny_model(
    family: str = "gpt2",
    generation: Optional[str] = None,
    *,
    seed: int = 0,
    padding_side: str = "right",
    device: str = "cpu",
    stress: Optional[bool] = None,
    processed: bool = False,
    **kwargs,
):
    """A tiny random TransformerLens model of ``family``; ``generation`` defaults to what is
    installed ("bridge" on TL 4, "hooked" before). A new model on each call (the HF weights
    are built once per process); ``processed`` applies TL 3's default weight processing."""
    if generation is None:
        generation = installed_generation()
    hf = tiny_hf(family, seed=seed, stress=stress, **kwargs)
    tok = tiny_tokenizer(padding_side=padding_side, pad_token=_pad_token(family))
    if generation == "hooked" and (family not in _LEGACY or processed):
        return tiny_hooked(hf, tok, family, device=device, processed=processed)
    return wrap(hf, tok, generation=generation, device=device, name=f"tiny-{family}")


#: The columns of the architecture test matrix: a TL 4 bridge raw, the same in compatibility
#: mode, and a TL 2/3 HookedTransformer (unprocessed weights).
MODES = ("bridge", "compat", "hooked")


def matrix_modes(family: str) -> tuple:
    """The :data:`MODES` the installed TransformerLens can serve ``family`` in."""
    if installed_generation() == "bridge":
        return ("bridge", "compat")
    return ("hooked",) if family in HOOKED_FAMILIES else ()


@lru_cache(maxsize=None)
def matrix_case(family: str, mode: str):
    """``(model, hf)`` for the architecture matrix, built once per process: the stressed tiny
    ``family`` served in ``mode`` (one of :data:`MODES`), and a pristine copy of the very same
    Hugging Face model as the independent reference (booting wraps modules in place, so the
    reference is never the booted one). Shared: callers must not modify either."""
    if mode not in MODES:
        raise EmbedwalkError(f"mode must be one of {MODES}, got {mode!r}")
    model = tiny_model(family, "hooked" if mode == "hooked" else "bridge", stress=True)
    if mode == "compat":
        model.enable_compatibility_mode()
    return model, tiny_hf(family, stress=True)
