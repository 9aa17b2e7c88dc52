"""The decoding walk: generation as a walk through embedding space.

At every step the model folds the context into one composite context vector (the final
residual at the last position); the next token is drawn from the readout of that vector. The
walk records, per step, that vector, the chosen token, its probability under the model, the
running path log-probability, and a logit-lens summary of the step (each layer's top-1 token
and KL(final || layer) at the last position).

Each step re-runs the whole sequence (no KV cache): simple, identical in both TransformerLens
generations, and every step is an ordinary embedwalk pass, so readers see full activations.
That costs O(steps x length) forward work, fine for the short walks this is meant for.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from embedwalk._summary import summary_repr
from embedwalk.adapter import ModelAdapter, adapt
from embedwalk.errors import EmbedwalkError
from embedwalk.inputs import tokenize
from embedwalk.lenses.projection import directions, pca_2d
from embedwalk.run import Context, Reader, run

__all__ = ["DecodingWalk", "LastPositionReader", "decoding_walk", "filter_logits"]


class LastPositionReader(Reader):
    """The residual at the last real position at every readout point (embedding, each block)."""

    def hook_points(self, adapter: ModelAdapter) -> Sequence[str]:
        return [p.hook for p in adapter.readout_points()]

    def start(self, adapter: ModelAdapter) -> None:
        self.index = {p.hook: p.index for p in adapter.readout_points()}
        self.rows: dict[int, Tensor] = {}

    def read(self, name: str, value: Tensor, ctx: Context) -> None:
        self.rows[self.index[name]] = value[0, ctx.batch.last[0]].detach()

    def result(self) -> Float[Tensor, "point d_model"]:
        return torch.stack([self.rows[i] for i in sorted(self.rows)])


def filter_logits(logits: Float[Tensor, "vocab"], top_k: Optional[int], top_p: Optional[float]) -> Tensor:
    """Logits with everything outside the top-k and the top-p nucleus set to -inf."""
    out = logits.clone()
    if top_k is not None:
        kth = out.topk(min(top_k, out.shape[-1])).values[-1]
        out[out < kth] = float("-inf")
    if top_p is not None:
        sorted_logits, order = out.sort(descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        drop = cum - sorted_logits.softmax(-1) >= top_p
        out[order[drop]] = float("-inf")
    return out


@summary_repr
@dataclass
class DecodingWalk:
    """One generation, step by step.

    ``context[i]`` is the composite vector the model composed before choosing ``chosen[i]``;
    ``logprob[i]`` is that token's log-probability under the model (temperature 1, unfiltered),
    ``path_logprob[i]`` the running sum. ``lens_top1[i, j]`` and ``lens_kl[i, j]`` are the
    logit lens at readout ``j`` (embedding, then each block) of step ``i``.
    """

    prompt_tokens: Int[Tensor, "prompt"]
    chosen: Int[Tensor, "step"]
    logprob: Float[Tensor, "step"]
    path_logprob: Float[Tensor, "step"]
    context: Float[Tensor, "step d_model"]
    lens_top1: Int[Tensor, "step point"]
    lens_kl: Float[Tensor, "step point"]
    readout_labels: list[str]
    token_strs: dict[int, str] = field(default_factory=dict)
    token_vectors: Optional[Float[Tensor, "step d_model"]] = field(default=None, repr=False)
    stopped_at_eos: bool = False

    def _headline(self) -> list[str]:
        n = len(self.chosen)
        if n == 0:
            return ["no tokens generated"]
        stop = " (stopped at EOS)" if self.stopped_at_eos else ""
        return [f"{len(self.prompt_tokens)} prompt tokens, {n} generated{stop}: {self.text[:70]!r}",
                f"path log-prob {float(self.path_logprob[-1]):.3f} nats; step prob min {float(self.prob.min()):.3f}, "
                f"mean {float(self.prob.mean()):.3f}; {len(self.readout_labels)} readouts per step"]

    @property
    def prob(self) -> Float[Tensor, "step"]:
        return self.logprob.exp()

    @property
    def tokens(self) -> Int[Tensor, "total"]:
        """Prompt and generated tokens together."""
        return torch.cat([self.prompt_tokens, self.chosen])

    def _s(self, i) -> str:
        return self.token_strs.get(int(i), f"<{int(i)}>")

    @property
    def text(self) -> str:
        return "".join(self._s(t) for t in self.chosen)

    def to_dataframe(self):
        """One row per (step, readout): the chosen token and its step/path log-prob, with the
        logit lens of that step (``layer``, ``lens_top1``, ``kl_to_final``)."""
        import pandas as pd

        rows = []
        for i in range(len(self.chosen)):
            for j, label in enumerate(self.readout_labels):
                rows.append(dict(
                    step=i, token=self._s(self.chosen[i]), token_id=int(self.chosen[i]),
                    prob=float(self.prob[i]), logprob=float(self.logprob[i]), path_logprob=float(self.path_logprob[i]),
                    layer=label, lens_top1=self._s(self.lens_top1[i, j]), kl_to_final=float(self.lens_kl[i, j]),
                ))
        return pd.DataFrame(rows)

    def steps(self):
        """One row per step: token, prob, path log-prob, context-vector norm, and the first
        readout whose top-1 already is the chosen token."""
        import pandas as pd

        first = []
        for i in range(len(self.chosen)):
            hit = (self.lens_top1[i] == self.chosen[i]).nonzero().flatten()
            first.append(self.readout_labels[int(hit[0])] if len(hit) else "-")
        return pd.DataFrame(dict(
            step=list(range(len(self.chosen))), token=[self._s(t) for t in self.chosen], prob=self.prob.tolist(),
            path_logprob=self.path_logprob.tolist(), context_norm=self.context.norm(dim=-1).tolist(), first_layer_top1=first,
        ))

    def plot(self, ax=None):
        """The walk: context vectors (a path, coloured by step) and the chosen tokens'
        unembedding vectors (stars), PCA-projected to 2-D on their directions; a dashed line
        joins each context vector to the token it chose. Labels (``step: token``, whitespace
        shown as ``␣`` / ``\\n``) are placed without overlap."""
        import matplotlib.pyplot as plt

        from embedwalk.figures import place_labels, visible_token

        if len(self.chosen) == 0:
            raise EmbedwalkError("this walk generated no tokens, so there is nothing to plot")
        ctx = directions(self.context)
        tok = directions(self.token_vectors)
        xy, ratio = pca_2d(torch.cat([ctx, tok]))
        c_xy, t_xy = xy[: len(ctx)], xy[len(ctx) :]
        own = ax is None
        if own:
            fig, ax = plt.subplots(figsize=(7.5, 5.8))
        else:
            fig = ax.figure
        n = len(ctx)
        for i in range(n):
            ax.plot([c_xy[i, 0], t_xy[i, 0]], [c_xy[i, 1], t_xy[i, 1]], "--", color="0.75", lw=0.7, zorder=1)
        ax.plot(c_xy[:, 0], c_xy[:, 1], "-", color="tab:blue", lw=1, zorder=2)
        from matplotlib.colors import ListedColormap

        blues = ListedColormap(plt.get_cmap("Blues")(np.linspace(0.3, 1.0, 256)))  # the first step stays visible
        sc = ax.scatter(c_xy[:, 0], c_xy[:, 1], c=range(n), cmap=blues, vmin=0, vmax=max(n - 1, 1), s=30, zorder=3,
                        edgecolors="k", linewidths=0.3, label="context vector (final residual, last position)")
        ax.scatter(t_xy[:, 0], t_xy[:, 1], marker="*", s=110, color="tab:red", edgecolors="k", linewidths=0.3,
                   label="chosen token's unembedding vector", zorder=3)
        cb = fig.colorbar(sc, ax=ax, pad=0.02)
        cb.set_label("generation step")
        cb.locator = __import__("matplotlib.ticker", fromlist=["MaxNLocator"]).MaxNLocator(integer=True)
        cb.update_ticks()
        ax.set_xlabel(f"PC1 ({100 * ratio[0]:.0f}% of variance)")
        ax.set_ylabel(f"PC2 ({100 * ratio[1]:.0f}% of variance)")
        ax.set_title(f"decoding walk: {visible_token(self.text, 48)}\n{n} steps, path log-prob "
                     f"{float(self.path_logprob[-1]):.2f} nats", fontsize=9)
        ax.legend(fontsize=7, loc="best")
        if own:
            fig.tight_layout()
        labels = [f"{i}: {visible_token(self._s(self.chosen[i]), 10)}" for i in range(n)]
        place_labels(ax, t_xy, labels, priority=[-i for i in range(n)], fontsize=7, color="tab:red")
        place_labels(ax, c_xy, [str(i) for i in range(n)], priority=[-i for i in range(n)], fontsize=6, color="tab:blue",
                     offset=(-8, 3))
        return fig


def decoding_walk(
    model,
    prompt,
    *,
    max_new_tokens: int = 20,
    temperature: float = 0.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    seed: Optional[int] = None,
    stop_at_eos: bool = True,
    prepend_bos: Optional[bool] = None,
    progress: Optional[bool] = None,
) -> DecodingWalk:
    """Generate from ``prompt`` (a string or a 1-D / [1, pos] token tensor), recording the walk.

    ``temperature=0`` is greedy (argmax of the model's own logits); ``temperature>0`` samples
    from ``softmax(logits / temperature)`` restricted to ``top_k`` tokens and the ``top_p``
    nucleus, reproducibly for a given ``seed``. Recorded probabilities are the model's own
    (temperature 1, unfiltered), so the path log-probability is the sequence's log-likelihood.
    Each step re-runs the whole sequence (see the module docstring); a progress bar counts
    the steps (``progress=False`` silences it).
    """
    from embedwalk.progress import progress_scope

    a = adapt(model)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise EmbedwalkError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
    if temperature < 0:
        raise EmbedwalkError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise EmbedwalkError(f"top_k must be a positive int or None, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise EmbedwalkError(f"top_p must lie in (0, 1], got {top_p!r}")
    if not isinstance(prompt, (str, Tensor)):
        raise EmbedwalkError("decoding_walk takes one prompt: a string or a 1-D token tensor")
    tokens, mask = tokenize(a, prompt, prepend_bos=prepend_bos)
    if tokens.shape[0] != 1:
        raise EmbedwalkError(f"decoding_walk takes one prompt, got {tokens.shape[0]} rows")
    seq = tokens[0, mask[0]]
    prompt_tokens = seq.clone()
    gen = torch.Generator(device="cpu")
    if seed is not None:
        gen.manual_seed(seed)
    eos = getattr(a.tokenizer, "eos_token_id", None) if a.tokenizer is not None else None

    chosen, logprobs, contexts, top1s, kls = [], [], [], [], []
    stopped = False
    # One bar over the steps; each step's pass advances it from inside (a long prompt's
    # steps are slow ones).
    with progress_scope(max_new_tokens, "decoding_walk", unit="token", progress=progress):
        for _ in range(max_new_tokens):
            own = []
            reader = LastPositionReader()
            (resid,) = run(a, seq[None], readers=[reader], progress=progress,
                           on_logits=lambda lg, ctx: own.append(lg[0, -1].detach()))
            logits = own[0].float()
            logp = logits.log_softmax(-1)
            with torch.no_grad():
                lens_logp = a.readout(resid).float().log_softmax(-1)  # [point, vocab]
            kl = (logp.exp() * (logp - lens_logp)).sum(-1).clamp_min(0)
            if temperature == 0:
                nxt = int(filter_logits(logits, top_k, top_p).argmax())
            else:
                probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1).cpu()
                nxt = int(torch.multinomial(probs, 1, generator=gen))
            chosen.append(nxt)
            logprobs.append(float(logp[nxt]))
            contexts.append(resid[-1].float().cpu())
            top1s.append(lens_logp.argmax(-1).cpu())
            kls.append(kl.cpu())
            seq = torch.cat([seq, torch.tensor([nxt])])
            if stop_at_eos and eos is not None and nxt == int(eos):
                stopped = True
                break

    d = a.d_model
    ids = chosen
    lp = torch.tensor(logprobs, dtype=torch.float64)
    all_ids = sorted(set(ids) | set(torch.cat(top1s).tolist() if top1s else []) | set(prompt_tokens.tolist()))
    n_points = len(a.readout_points())
    return DecodingWalk(
        prompt_tokens=prompt_tokens,
        chosen=torch.tensor(ids, dtype=torch.long),
        logprob=lp.float(),
        path_logprob=lp.cumsum(0).float(),
        context=torch.stack(contexts) if contexts else torch.zeros(0, d),
        lens_top1=torch.stack(top1s) if top1s else torch.zeros(0, n_points, dtype=torch.long),
        lens_kl=torch.stack(kls) if kls else torch.zeros(0, n_points),
        readout_labels=[p.label for p in a.readout_points()],
        token_strs=dict(zip(all_ids, a.to_str_tokens(all_ids))),
        token_vectors=a.W_U[:, torch.tensor(ids, dtype=torch.long).to(a.device)].detach().T.float().cpu() if ids else torch.zeros(0, d),
        stopped_at_eos=stopped,
    )
