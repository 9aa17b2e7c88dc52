"""Tiny random models built offline, for tests, tutorials and quick experiments.

GPT-2-style (LayerNorm, learned positions) and Llama-style (RMSNorm, rotary, GQA) models
with a word-level tokenizer ("w2 w3 ..."), served as a TL 4 ``TransformerBridge`` or a TL 2/3
``HookedTransformer`` holding the very same Hugging Face weights.
"""

from __future__ import annotations

import os
import shutil
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch

from embedwalk.models import cache_dir, installed_generation, wrap

__all__ = ["tiny_tokenizer", "tiny_hf", "tiny_model", "installed_generation", "VOCAB"]

VOCAB = 200


@lru_cache(maxsize=None)
def _tokenizer_dir(vocab: int) -> Path:
    import tokenizers
    from transformers import PreTrainedTokenizerFast

    path = cache_dir() / f"tiny-tokenizer-{vocab}"
    if not (path / "tokenizer_config.json").exists():
        words = {"<unk>": 0, "<|endoftext|>": 1, **{f"w{i}": i for i in range(2, vocab)}}
        tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=words, unk_token="<unk>"))
        tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
        tmp = path.with_name(f"{path.name}.partial-{os.getpid()}")
        PreTrainedTokenizerFast(
            tokenizer_object=tok, unk_token="<unk>", bos_token="<|endoftext|>",
            eos_token="<|endoftext|>", pad_token="<|endoftext|>",
        ).save_pretrained(tmp)
        try:
            tmp.rename(path)
        except OSError:  # another process won the race; its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def tiny_tokenizer(vocab: int = VOCAB, padding_side: str = "right"):
    """A word-level tokenizer: "w2 w3 w4" -> [2, 3, 4]; BOS/EOS/PAD is id 1."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(_tokenizer_dir(vocab))
    tok.padding_side = padding_side
    return tok


def tiny_hf(arch: str = "gpt2", *, seed: int = 0, vocab: int = VOCAB, layers: int = 2, d_model: int = 64, dtype=torch.float32):
    """A randomly initialised GPT-2-style or Llama-style Hugging Face model."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_layer=layers, n_embd=d_model, n_head=4, vocab_size=vocab, n_positions=128, bos_token_id=1, eos_token_id=1))
    elif arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(
            hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=128,
            bos_token_id=1, eos_token_id=1, pad_token_id=1,
        ))
    else:
        raise ValueError(f"arch must be 'gpt2' or 'llama', got {arch!r}")
    return model.to(dtype).eval()


def tiny_model(
    arch: str = "gpt2",
    generation: Optional[str] = None,
    *,
    seed: int = 0,
    padding_side: str = "right",
    device: str = "cpu",
    **kwargs,
):
    """A tiny random TransformerLens model. ``generation`` defaults to what is installed."""
    if generation is None:
        generation = installed_generation()
    hf = tiny_hf(arch, seed=seed, **kwargs)
    return wrap(hf, tiny_tokenizer(padding_side=padding_side), generation=generation, device=device, name=f"tiny-{arch}")
