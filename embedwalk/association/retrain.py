"""Train the same small architecture twice from scratch: standard attention vs uniform aggregation.

Both runs share the seed (so the initial weights are identical, q/k projections included),
the data order and the number of steps; only the attention differs. The uniform run replaces
Hugging Face's attention function with the causal running mean of the values (grouped-query
heads expanded), registered as ``"embedwalk_uniform"``; its q/k projections then get no
gradient and stay at their initial values.

Text: real English prose that every Python install ships, the Python Language Reference
topics in ``pydoc_data.topics`` (the text ``help()`` shows, written by the Python
developers; PSF licence). Literal code and grammar lines are dropped, prose paragraphs kept.
Tokens: SmolLM2's BPE tokenizer when available (``embedwalk.load_model('smollm2')``'s), its ids
densely re-indexed to those that occur in the corpus so the softmax stays small on a CPU;
``tokenizer="bytes"`` uses raw UTF-8 bytes instead.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
from jaxtyping import Int
from torch import Tensor

from embedwalk._summary import summary_repr
from embedwalk.errors import EmbedwalkError

__all__ = ["RetrainConfig", "RetrainResult", "retrain", "prose_corpus", "encode_corpus", "uniform_attention", "build_model"]

ATTN_NAME = "embedwalk_uniform"


# --------------------------------------------------------------------------- text
def prose_corpus() -> str:
    """English prose paragraphs from the Python Language Reference shipped in ``pydoc_data``."""
    from pydoc_data.topics import topics

    paras = []
    for key in sorted(topics):
        for block in re.split(r"\n\s*\n", topics[key]):
            lines = block.split("\n")
            # Code, grammar and tables are indented or underlined; prose starts at column 0.
            if any(l.startswith((" ", "\t")) for l in lines) or re.fullmatch(r"[*=\-+|]+", lines[-1].strip() or "x"):
                continue
            text = " ".join(l.strip() for l in lines).strip()
            if len(text) > 80 and sum(c.isalpha() for c in text) > 0.7 * len(text):
                paras.append(text)
    return "\n\n".join(paras)


def _smollm2_tokenizer():
    from transformers import AutoTokenizer

    from embedwalk.models import cache_dir, smollm2_gguf_path

    path = smollm2_gguf_path()
    tok_dir = cache_dir() / f"tokenizer-{path.stem}"
    if (tok_dir / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(tok_dir)
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def encode_corpus(text: str, tokenizer: str = "smollm2") -> tuple[Int[Tensor, "n"], int, dict]:
    """Token ids of ``text`` in a dense vocabulary, the vocabulary size, and how it was built."""
    if tokenizer == "bytes":
        return torch.tensor(list(text.encode("utf-8")), dtype=torch.long), 256, {"tokenizer": "bytes"}
    if tokenizer != "smollm2":
        raise EmbedwalkError(f"tokenizer must be 'smollm2' or 'bytes', got {tokenizer!r}")
    ids = torch.tensor(_smollm2_tokenizer()(text)["input_ids"], dtype=torch.long)
    used, dense = torch.unique(ids, return_inverse=True)
    return dense, int(used.numel()), {"tokenizer": "smollm2", "smollm2_ids": used.tolist()}


# --------------------------------------------------------------------------- model
def uniform_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """HF attention interface: causal running mean of ``value``; ``query``/``key`` are unused.

    Training feeds unpadded windows, so every key is valid; a padding mask is refused rather
    than silently ignored.
    """
    if attention_mask is not None and attention_mask.ndim == 2 and not bool(attention_mask.all()):
        raise EmbedwalkError("uniform_attention trains on unpadded windows; it does not take padding")
    n = value.shape[2]
    count = torch.arange(1, n + 1, device=value.device, dtype=torch.float32)[:, None]
    mean = (torch.cumsum(value.float(), dim=2) / count).to(value.dtype)
    mean = mean.repeat_interleave(query.shape[1] // value.shape[1], dim=1)
    return mean.transpose(1, 2).contiguous(), None


def _register():
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, uniform_attention)


@dataclass
class RetrainConfig:
    """Sizes and schedule. The default runs both trainings in about a minute on 2 CPU cores (62 s measured)."""

    layers: int = 4
    d_model: int = 128
    heads: int = 4
    kv_heads: int = 2
    d_mlp: int = 384
    ctx: int = 64
    batch: int = 16
    steps: int = 300
    lr: float = 2e-3
    warmup: int = 30
    eval_every: int = 30
    eval_windows: int = 32
    seed: int = 0
    tokenizer: str = "smollm2"
    max_tokens: Optional[int] = None

    @classmethod
    def scaled(cls, scale: float, **overrides) -> "RetrainConfig":
        """Bigger (GPU) runs: width, depth and steps grow with ``scale`` (1 = default)."""
        base = cls()
        s = max(scale, 0.01)
        heads = max(2, int(round(base.heads * math.sqrt(s))) // 2 * 2)
        cfg = cls(
            layers=max(1, round(base.layers * math.sqrt(s))), d_model=max(32, int(base.d_model * math.sqrt(s)) // heads * heads),
            heads=heads, kv_heads=heads // 2, d_mlp=max(64, int(base.d_mlp * math.sqrt(s))),
            ctx=base.ctx if s <= 1 else 128, steps=max(10, int(base.steps * s)), eval_every=max(5, int(base.eval_every * s)),
        )
        for k, v in overrides.items():
            setattr(cfg, k, v)
        return cfg


def build_model(cfg: RetrainConfig, vocab: int, *, uniform: bool):
    """A Llama-style HF model (RMSNorm, rotary, GQA) with standard or uniform attention."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if cfg.d_model % cfg.heads or cfg.heads % cfg.kv_heads:
        raise EmbedwalkError(
            f"d_model ({cfg.d_model}) must divide by heads ({cfg.heads}) and heads by kv_heads ({cfg.kv_heads})"
        )
    _register()
    config = LlamaConfig(
        hidden_size=cfg.d_model, intermediate_size=cfg.d_mlp, num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads, vocab_size=vocab,
        max_position_embeddings=max(cfg.ctx, 128), tie_word_embeddings=True,
    )
    config._attn_implementation = ATTN_NAME if uniform else "sdpa"
    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(config)


# --------------------------------------------------------------------------- training
@summary_repr
@dataclass
class RetrainResult:
    """Validation-loss curves (nats per token) of the two runs at the same steps."""

    steps: list[int]
    standard: list[float]
    uniform: list[float]
    train_standard: list[float] = field(default_factory=list)
    train_uniform: list[float] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)

    def _headline(self) -> list[str]:
        if not self.steps:
            return ["no evaluation steps"]
        return [f"{len(self.steps)} evaluations up to step {self.steps[-1]}; final validation loss (nats/token): "
                f"standard {self.standard[-1]:.4f}, uniform {self.uniform[-1]:.4f}, gap {self.gap:+.4f}"]

    @property
    def gap(self) -> float:
        """Final validation loss of the uniform run minus the standard run's (positive: attention helps)."""
        return self.uniform[-1] - self.standard[-1]

    def to_dataframe(self):
        import pandas as pd

        rows = [{"step": s, "attention": name, "val_loss": v}
                for name, curve in (("standard", self.standard), ("uniform", self.uniform))
                for s, v in zip(self.steps, curve)]
        return pd.DataFrame(rows)

    def plot(self):
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
        ax.plot(self.steps, self.standard, marker="o", label="standard attention")
        ax.plot(self.steps, self.uniform, marker="o", label="uniform aggregation")
        ax.set(xlabel="training step", ylabel="validation loss (nats/token)")
        ax.set_title(f"same architecture, data and seed\nfinal gap (uniform − standard) {self.gap:+.3f} nats/token", fontsize=10)
        ax.legend(fontsize=8)
        return fig

    def to_json(self) -> dict:
        return asdict(self) | {"gap": self.gap}


def _windows(ids: Tensor, ctx: int) -> Tensor:
    n = (len(ids) - 1) // ctx
    return ids[: n * ctx + 1].unfold(0, ctx + 1, ctx)


def _evaluate(model, val: Tensor, batch: int) -> float:
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(val), batch):
            w = val[i : i + batch]
            logits = model(w[:, :-1]).logits.float()
            total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten(), reduction="sum"))
            count += w[:, 1:].numel()
    model.train()
    return total / count


def _train(cfg, vocab, train, val, order, *, uniform, device, log, bar):
    model = build_model(cfg, vocab, uniform=uniform).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.1, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup)
                                              * 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps)))
    steps, curve, train_curve = [], [], []
    model.train()
    for step in range(cfg.steps + 1):
        if step % cfg.eval_every == 0 or step == cfg.steps:
            steps.append(step)
            curve.append(_evaluate(model, val, cfg.batch))
            log(f"{'uniform ' if uniform else 'standard'} step {step:5d}  val {curve[-1]:.4f}")
        if step == cfg.steps:
            break
        w = train[order[step]].to(device)
        logits = model(w[:, :-1]).logits.float()
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        train_curve.append(loss.item())
        bar.update(1)
    return steps, curve, train_curve


def retrain(
    config: Optional[RetrainConfig] = None,
    *,
    text: Optional[str] = None,
    device: Optional[str] = None,
    verbose: bool = False,
    progress: Optional[bool] = None,
    **overrides,
) -> RetrainResult:
    """Train standard and uniform-aggregation models on the same text; return both curves.

    ``config`` or keyword overrides (``steps=..., d_model=...``) set the size; ``text``
    defaults to :func:`prose_corpus`. The last 10% of the token stream is held out. A progress
    bar counts the training steps of both runs (``progress=False`` silences it).
    """
    from embedwalk.progress import progress_bar

    from embedwalk.models import default_device

    cfg = config or RetrainConfig()
    for k, v in overrides.items():
        if not hasattr(cfg, k):
            raise EmbedwalkError(f"unknown retrain setting {k!r}; valid: {sorted(asdict(cfg))}")
        setattr(cfg, k, v)
    device = device or default_device()
    ids, vocab, tok_info = encode_corpus(text if text is not None else prose_corpus(), cfg.tokenizer)
    if cfg.max_tokens:
        ids = ids[: cfg.max_tokens]
    split = int(0.9 * len(ids))
    train, val = _windows(ids[:split], cfg.ctx), _windows(ids[split:], cfg.ctx)[: cfg.eval_windows]
    if len(train) < cfg.batch or len(val) == 0:
        raise EmbedwalkError(
            f"the text is too short for ctx={cfg.ctx}, batch={cfg.batch}: {len(ids)} tokens give "
            f"{len(train)} training and {len(val)} validation windows"
        )
    g = torch.Generator().manual_seed(cfg.seed)
    order = torch.randint(len(train), (cfg.steps, cfg.batch), generator=g)  # one data order for both runs
    log = print if verbose else (lambda *_: None)
    log(f"{len(ids)} tokens, vocab {vocab}, {len(train)} train / {len(val)} val windows of {cfg.ctx}")
    out, secs = {}, {}
    bar = progress_bar(total=2 * cfg.steps, desc="retrain (standard, then uniform)", unit="step", progress=progress)
    for uniform in (False, True):
        t0 = time.perf_counter()
        out[uniform] = _train(cfg, vocab, train, val, order, uniform=uniform, device=device, log=log, bar=bar)
        secs["uniform" if uniform else "standard"] = time.perf_counter() - t0
    bar.close()
    steps, std, std_train = out[False]
    _, uni, uni_train = out[True]
    info = asdict(cfg) | {"vocab": vocab, "tokens": len(ids), "tokenizer_info": tok_info["tokenizer"], "device": str(device)}
    return RetrainResult(steps, std, uni, std_train, uni_train, info, secs)
