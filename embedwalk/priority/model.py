"""Token-priority scores for every attention head of a TransformerLens model, in one pass.

Graphs are built from the corpus itself (query token ``tokens[t]``, label ``tokens[t+1]``;
see :func:`embedwalk.priority.heads.graphs_from_tokens`), then a reader scores each layer's
attention pattern inside its hook and keeps only per-head running sums, so no pattern is
ever cached.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from embedwalk.adapter import ModelAdapter, adapt
from embedwalk.errors import EmbedwalkError
from embedwalk.inputs import Inputs, tokenize
from embedwalk.run import Context, Reader, run

from .graphs import PriorityGraphs
from .heads import HeadPriorityResult, graphs_from_tokens, retrieval_mask, retrieval_scores

__all__ = ["HeadPriorityReader", "head_priority"]


def _score_mask(adapter: ModelAdapter, tokens: Tensor, mask: Tensor, exclude_bos: bool) -> Tensor:
    """Real tokens, without a leading BOS: heads park mass on it (an attention sink), which
    would otherwise swamp retrieval among the content tokens."""
    mask = mask.clone()
    tok = adapter.tokenizer
    bos = getattr(tok, "bos_token_id", None) if tok is not None else None
    if exclude_bos and bos is not None:
        first = mask.float().argmax(-1)
        rows = torch.arange(len(tokens))
        mask[rows, first] &= tokens[rows, first] != bos
    return mask


class HeadPriorityReader(Reader):
    """Accumulates :func:`retrieval_scores` of every head over all batches of a run."""

    def __init__(self, graphs: PriorityGraphs, *, layers: Optional[Sequence[int]] = None, exclude_bos: bool = True):
        self.graphs = graphs
        self.layers = layers
        self.exclude_bos = exclude_bos

    def start(self, adapter: ModelAdapter) -> None:
        layers = range(adapter.n_layers) if self.layers is None else self.layers
        self._layers = [adapter.check_layer(layer) for layer in layers]
        for layer in self._layers:  # an architecture whose keys cannot be known is refused before any forward
            adapter.reach(layer, torch.ones(1, 1, dtype=torch.bool))
        self._hooks = {adapter.hook("pattern", layer): i for i, layer in enumerate(self._layers)}
        shape = (len(self._layers), adapter.n_heads)
        self._sums = {k: torch.zeros(shape, dtype=torch.float64) for k in ("mass", "uniform", "spread")}
        self._n = torch.zeros(shape, dtype=torch.float64)
        self._n_spread = torch.zeros(shape, dtype=torch.float64)

    def hook_points(self, adapter: ModelAdapter) -> Sequence[str]:
        return list(self._hooks)

    def read(self, name: str, value: Tensor, ctx: Context) -> None:
        i = self._hooks[name]
        a = ctx.adapter
        if "priority" not in ctx.state:
            tokens = ctx.batch.tokens.cpu()
            ctx.state["priority"] = (tokens, _score_mask(a, tokens, ctx.batch.mask.cpu(), self.exclude_bos))
        tokens, mask = ctx.state["priority"]
        # The keys this layer reaches (its sliding window too); layers that reach the same keys
        # share the retrieval sets, which cost a Python loop over positions.
        reach = a.reach(self._layers[i], ctx.batch.mask.cpu())
        known = ctx.state.setdefault("priority_reach", [])
        retrieval = next((r for seen, r in known if torch.equal(seen, reach)), None)
        if retrieval is None:
            retrieval = retrieval_mask(tokens, mask, self.graphs, reach)
            known.append((reach, retrieval))
        s = retrieval_scores(value.float().cpu(), tokens, mask, self.graphs, retrieval=retrieval, reach=reach)
        n = s["n_positions"].double()
        if n[0] == 0:
            return
        self._sums["mass"][i] += s["mass"] * n
        self._sums["uniform"][i] += s["uniform"] * n
        self._n[i] += n
        n_spread = s["n_spread_positions"].double()
        self._sums["spread"][i] += torch.nan_to_num(s["spread"]) * n_spread
        self._n_spread[i] += n_spread

    def result(self) -> HeadPriorityResult:
        n = self._n.clamp_min(1)
        mass, uniform = self._sums["mass"] / n, self._sums["uniform"] / n
        none = self._n == 0
        nan = torch.tensor(float("nan"), dtype=torch.float64)
        scores = {
            "mass": mass,
            "uniform": uniform,
            "ratio": mass / uniform,
            "difference": mass - uniform,
            "spread": torch.where(self._n_spread > 0, self._sums["spread"] / self._n_spread.clamp_min(1), nan),
            "n_positions": self._n,
        }
        scores = {k: torch.where(none, nan, v) if k != "n_positions" else v for k, v in scores.items()}
        return HeadPriorityResult(scores, list(self._layers))


def head_priority(
    model,
    inputs: Inputs,
    *,
    graph_inputs: Optional[Inputs] = None,
    layers: Optional[Sequence[int]] = None,
    exclude_bos: bool = True,
    attention_mask: Optional[Tensor] = None,
    batch_size: int = 4,
    progress: Optional[bool] = None,
) -> HeadPriorityResult:
    """Per-head hard-retrieval (attention mass on the predicted top-priority tokens against
    uniform aggregation) and soft-composition (spread within them) scores on ``inputs``.

    Graphs come from ``graph_inputs`` (default: ``inputs`` themselves), keyed on the query
    token with the next token as label. ``ratio`` > 1 means a head prefers the tokens the
    priority graph predicts over what uniform causal aggregation would give them; the uniform
    baseline and the candidate keys are those each layer reaches
    (:meth:`ModelAdapter.reach`: causal, padding, sliding window), so a head attending
    uniformly over them scores ``ratio`` = 1 on every layer.

    Raises EmbedwalkError when no position can be scored, and ArchitectureError where a
    layer's reachable keys are unknown (chunked attention, attention sinks).
    """
    adapter = adapt(model)
    source = inputs if graph_inputs is None else graph_inputs
    tokens, mask = tokenize(adapter, source, attention_mask if graph_inputs is None else None)
    graphs = graphs_from_tokens(tokens, _score_mask(adapter, tokens, mask, exclude_bos), vocab_size=adapter.d_vocab)
    if len(graphs.keys) == 0:
        raise EmbedwalkError(
            "the corpus gave no priority graph: no prefix contains its own next token. Pass more or "
            "longer text (repeated words are what the graphs are built from)."
        )
    reader = HeadPriorityReader(graphs, layers=layers, exclude_bos=exclude_bos)
    (result,) = run(adapter, inputs, readers=[reader], attention_mask=attention_mask, batch_size=batch_size, progress=progress)
    if float(result.scores["n_positions"].sum()) == 0:
        raise EmbedwalkError(
            "no query position of `inputs` could be scored, so every score would be NaN: a position "
            "counts only when its token has a priority graph (built from "
            f"{'graph_inputs' if graph_inputs is not None else 'the inputs'}: "
            f"{len(graphs.keys)} query tokens have one) and that graph's top-priority tokens are some, but "
            "not all, of the earlier tokens of the same prompt (BOS excluded). Pass longer text with repeated words, or "
            "graph_inputs whose words recur in inputs."
        )
    return result
