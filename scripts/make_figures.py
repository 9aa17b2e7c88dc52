"""Make the figure gallery (docs/figures/*.png) from the real SmolLM2-135M, on a CPU.

    python scripts/make_figures.py [--only NAME ...] [--out docs/figures]

Every figure is a result's own ``.plot()`` saved with :func:`embedwalk.figures.save_figure`
(tight bounding box), so the gallery shows exactly what a user gets. Inputs are fixed and the
model is deterministic on CPU, so rerunning reproduces the figures. About 3 minutes on a
2-core CPU for the first ten figures and 1.8 minutes for the five after them (token_vectors
onwards; 62 s of that is multiple_choice).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("MPLBACKEND", "Agg")

import embedwalk as ew  # noqa: E402
from embedwalk.figures import save_figure  # noqa: E402

PROMPT = "The capital of France is Paris. The capital of Germany is"
FIGURES = {}


def figure(name, caption):
    def deco(fn):
        FIGURES[name] = (fn, caption)
        return fn
    return deco


@figure("logit_lens_kl", "Logit lens: KL(final ‖ readout) per readout and position, log colour scale (cells: top-1 token).")
def _kl(m, ctx):
    return ctx.setdefault("lens", ew.logit_lens(m, PROMPT, progress=False)).plot("kl_to_final")


@figure("logit_lens_rank", "Logit lens: rank of the next token, log scale; hatched = no target (last position).")
def _rank(m, ctx):
    return ctx.setdefault("lens", ew.logit_lens(m, PROMPT, progress=False)).plot("target_rank")


@figure("logit_lens_lines", "Logit lens: mean KL to the final distribution (log) and entropy per readout.")
def _lines(m, ctx):
    return ctx.setdefault("lens", ew.logit_lens(m, PROMPT, progress=False)).plot(kind="lines")


@figure("walk", "Encoding walk of the last position: residual directions after each attention (l.mid) and block (l), PCA.")
def _walk(m, ctx):
    return ew.walk_lens(m, PROMPT, progress=False).plot()


@figure("decoding_walk", "Decoding walk: context vectors and the chosen tokens' unembedding vectors, PCA.")
def _decoding(m, ctx):
    return ew.decoding_walk(m, "The capital of France is", max_new_tokens=8, progress=False).plot()


@figure("decompose", "Decomposition of the final residual: direct logit attribution of each part to ' Berlin'.")
def _decompose(m, ctx):
    return ew.decompose(m, PROMPT, token=" Berlin").plot()


@figure("head_priority", "Token-priority ratio per head (1 = uniform aggregation), diverging scale centred on 1.")
def _priority(m, ctx):
    from embedwalk.priority.model import head_priority

    from embedwalk.lenses.tuned import sample_text

    texts = sample_text("heldout")[:6]
    return head_priority(m, texts, progress=False).plot("ratio")


@figure("association_bias", "Association bias per head: distance to uniform aggregation and self-attention bias.")
def _assoc(m, ctx):
    from embedwalk.association.measure import association_bias
    from embedwalk.lenses.tuned import sample_text

    return association_bias(m, sample_text("heldout")[:4]).plot()


@figure("token_regression", "Held-out R² of ridge maps between token embeddings and concept features, against shuffled labels.")
def _regression(m, ctx):
    from embedwalk.concepts.experiments import token_regression

    return token_regression(m, ["number", "gender", "tense"], kinds=["embed"], n_perm=10, progress=False).plot()


@figure("layer_probes", "Probe accuracy per readout point with control task and shuffled labels.")
def _probes(m, ctx):
    from embedwalk.concepts.experiments import layer_probes

    return layer_probes(m, ["number", "gender"], n_perm=5, n_control=2, random_baseline=False, progress=False).plot()



@figure("token_vectors", "Norms of the token embeddings (W_E rows) of some words; the extreme words are named.")
def _token_vectors(m, ctx):
    from embedwalk.concepts.features import token_vectors

    words = ["Paris", "Berlin", "France", "Germany", "capital", "city", "the", "is", "of", "river",
             "mountain", "king", "queen", "dog", "cat", "run", "ran", "blue", "green", "seven"]
    return token_vectors(m, words).plot()


@figure("context_vectors", "Norm of the last token's residual at every readout point, mean and range over prompts.")
def _context_vectors(m, ctx):
    from embedwalk.concepts.features import context_vectors
    from embedwalk.lenses.tuned import sample_text

    return context_vectors(m, sample_text("heldout")[:8], progress=False).plot()


@figure("store", "An activation store's mean residual norm per layer (cache_activations, then open_store(...).plot()).")
def _store(m, ctx):
    import tempfile

    from embedwalk.lenses.tuned import sample_text
    from embedwalk.store import cache_activations, open_store

    with tempfile.TemporaryDirectory() as tmp:
        cache_activations(m, sample_text("heldout")[:8], Path(tmp) / "acts", dtype="float32", progress=False)
        return open_store(Path(tmp) / "acts").plot()


@figure("multiple_choice", "Multiple choice (first 16 items): concept-similarity accuracy per readout point and the scoring baselines.")
def _multiple_choice(m, ctx):
    from embedwalk.concepts.datasets import load_dataset
    from embedwalk.concepts.experiments import multiple_choice

    return multiple_choice(m, load_dataset("multiple_choice")[:16], progress=False).plot()


@figure("priority_reproduction", "Single-layer priority training (no model): correlations with the SVM solution and attention mass, mean ± std over data sets.")
def _reproduction(m, ctx):
    from embedwalk.priority.reproduce import reproduce

    return reproduce("cyclic", n_datasets=3, iterations=1500, seed=0, log_every=50, progress=False).plot()

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="*", default=None, choices=sorted(FIGURES))
    p.add_argument("--out", default="docs/figures")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import matplotlib.pyplot as plt

    model = ew.load_model("smollm2", device="cpu")
    ctx: dict = {}
    for name in args.only or FIGURES:
        fn, caption = FIGURES[name]
        t0 = time.perf_counter()
        fig = fn(model, ctx)
        path = save_figure(fig, out / f"{name}.png", dpi=110)
        plt.close(fig)
        print(f"{path}  {path.stat().st_size / 1024:.0f} KB  {time.perf_counter() - t0:.1f} s  {caption}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
