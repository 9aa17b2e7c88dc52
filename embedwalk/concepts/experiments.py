"""The concept-space experiments of paper 1, run on a TransformerLens model.

(a) :func:`token_regression` -- token embedding / unembedding vectors against concept
    features, both directions, held-out R² over group folds vs shuffled-label controls.
(b) :func:`layer_probes` -- where along the walk a concept becomes linearly readable:
    probes on the residual at a word's last token at every readout point, with
    selectivity against a control task, permutation p-values, and a randomly
    initialised copy of the model as a baseline.
(c, d) :func:`multiple_choice` -- the concept-similarity test and the generation test
    conditioned on aggregated concept vectors, against full-context and question-only
    log-likelihood scoring and chance.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from embedwalk._summary import summary_repr
from embedwalk.adapter import adapt
from embedwalk.casting import cast_finite
from embedwalk.errors import EmbedwalkError
from embedwalk.lenses.logit import refuse_layers
from embedwalk.run import Context, Writer, run

from .controls import evaluate_controls, permutation_p_value, probe_cv_scorer, shuffle_labels_by_group
from .datasets import load_dataset
from .features import (
    REDUCTIONS,
    PointsReader,
    SegmentReader,
    point_labels,
    token_vectors,
)
from .ridge import fit_ridge
from .stats import FoldedStats, group_folds

__all__ = [
    "ConceptTable",
    "concept_table",
    "CONCEPTS",
    "random_copy",
    "TokenRegressionResult",
    "token_regression",
    "LayerProbeResult",
    "layer_probes",
    "EmbedWriter",
    "continuation_logprobs",
    "MultipleChoiceResult",
    "multiple_choice",
    "DEFAULT_TEMPLATES",
    "fit_from_store",
]


# --------------------------------------------------------------------------- concept tables


@summary_repr
@dataclass
class ConceptTable:
    """Words with concept features.

    ``features`` are the regression columns (one-hot / numeric), ``label`` the class of each
    word for probes (``classes`` names them), ``group`` keeps related words (a lemma and its
    plural, a male/female pair) in the same cross-validation fold.
    """

    name: str
    words: list[str]
    features: pd.DataFrame
    label: np.ndarray
    classes: list[str]
    group: np.ndarray

    def __post_init__(self):
        # A word listed twice (e.g. 'put' as base and past) would sit in two classes.
        seen, keep = {}, []
        for i, w in enumerate(self.words):
            if w in seen:
                continue
            seen[w] = i
            keep.append(i)
        if len(keep) < len(self.words):
            self.words = [self.words[i] for i in keep]
            self.features = self.features.iloc[keep].reset_index(drop=True)
            self.label, self.group = self.label[keep], self.group[keep]

    def __len__(self) -> int:
        return len(self.words)

    def subset(self, rows) -> "ConceptTable":
        rows = list(rows)
        return ConceptTable(self.name, [self.words[i] for i in rows],
                            self.features.iloc[rows].reset_index(drop=True),
                            self.label[rows], self.classes, self.group[rows])


def _pairs(name, a_words, b_words, a_class, b_class, feature) -> ConceptTable:
    n = len(a_words)
    words = list(a_words) + list(b_words)
    label = np.r_[np.zeros(n, int), np.ones(n, int)]
    return ConceptTable(name, words, pd.DataFrame({feature: label.astype(float)}), label,
                        [a_class, b_class], np.r_[np.arange(n), np.arange(n)])


def _number() -> ConceptTable:
    df = load_dataset("plurals")
    return _pairs("number", df.singular, df.plural, "singular", "plural", "plural")


def _gender() -> ConceptTable:
    df = load_dataset("gender_pairs")
    return _pairs("gender", df.male, df.female, "male", "female", "female")


def _tense() -> ConceptTable:
    df = load_dataset("verb_tenses")
    df = df[df.base != df.past]
    return _pairs("tense", df.base, df.past, "present", "past", "past")


def _colour() -> ConceptTable:
    df = load_dataset("colours")
    rgb = np.array([[int(h[i:i + 2], 16) / 255 for i in (1, 3, 5)] for h in df.hex])
    classes = sorted(df.temperature.unique())
    label = np.array([classes.index(t) for t in df.temperature])
    feats = pd.DataFrame({"red": rgb[:, 0], "green": rgb[:, 1], "blue": rgb[:, 2]})
    for c in classes:
        feats[c] = (label == classes.index(c)).astype(float)
    return ConceptTable("colour", list(df.colour), feats, label, classes, np.arange(len(df)))


def _number_value() -> ConceptTable:
    df = load_dataset("number_words")
    classes = ["small", "large"]  # below / at least 10
    label = (df.value >= 10).to_numpy().astype(int)
    feats = pd.DataFrame({"value": df.value.astype(float), "log_value": np.log1p(df.value)})
    return ConceptTable("number_value", list(df.word), feats, label, classes, np.arange(len(df)))


def _country() -> ConceptTable:
    df = load_dataset("country_capitals")
    n = len(df)
    words = list(df.country) + list(df.capital)
    classes = sorted(df.continent.unique())
    cont = np.r_[df.continent, df.continent]
    label = np.array([classes.index(c) for c in cont])
    feats = pd.DataFrame({"capital": np.r_[np.zeros(n), np.ones(n)]})
    for c in classes:
        feats[c] = (cont == c).astype(float)
    return ConceptTable("continent", words, feats, label, classes, np.r_[np.arange(n), np.arange(n)])


CONCEPTS = {
    "number": _number, "gender": _gender, "tense": _tense,
    "colour": _colour, "number_value": _number_value, "continent": _country,
}


def concept_table(name: str) -> ConceptTable:
    """One of :data:`CONCEPTS`: number, gender, tense, colour, number_value, continent."""
    if name not in CONCEPTS:
        raise EmbedwalkError(f"unknown concept {name!r}; choose from {sorted(CONCEPTS)}")
    return CONCEPTS[name]()


def _tables(concepts) -> list[ConceptTable]:
    if isinstance(concepts, (str, ConceptTable)):
        concepts = [concepts]
    return [c if isinstance(c, ConceptTable) else concept_table(c) for c in concepts]


# --------------------------------------------------------------------------- random copy


def random_copy(model, seed: int = 0, std: float = 0.02):
    """A deep copy of ``model`` with every parameter re-initialised (weights ~ N(0, std²),
    norm scales 1, biases 0), the usual GPT-2/Llama initialisation, from a fixed seed.

    Same architecture, tokenizer, hooks and buffers (rotary tables), so any reader runs on
    it unchanged. Tied embeddings stay tied (deepcopy keeps the sharing).
    """
    clone = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in clone.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * std)
            else:
                leaf = name.lower()
                is_norm = any(k in leaf for k in ("norm", "ln")) and not leaf.endswith(("bias", ".b"))
                p.fill_(1.0 if is_norm else 0.0)
    return clone


# --------------------------------------------------------------------------- (a) token regression


def _cv_r2(x: Tensor, y: Tensor, folds: np.ndarray, n_folds: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-target held-out R² and SST of a group-fold ridge with CV alpha per target."""
    fs = FoldedStats(n_folds)
    fs.update(x.double(), y.double(), folds=folds)
    fit = fit_ridge(fs)
    return fit.cv_r2.cpu().numpy(), np.asarray(fit.meta["sst"])


def _overall(r2: np.ndarray, sst: np.ndarray) -> float:
    return float(1 - ((1 - r2) * sst).sum() / sst.sum())


@summary_repr
@dataclass
class TokenRegressionResult:
    """Held-out R² of ridge maps between word vectors and concept features.

    ``table`` rows: concept, kind (embed / unembed), direction, target ('all' is the
    variance-weighted R² over targets), cv_r2, the shuffled-label null (mean, 95th
    percentile) and the permutation p-value.
    """

    table: pd.DataFrame
    n_perm: int
    meta: dict = field(default_factory=dict)

    def _headline(self) -> list[str]:
        from embedwalk._summary import table_lines

        df = self.table[self.table.target == "all"]
        cols = [c for c in ("concept", "kind", "direction", "n", "cv_r2", "null_mean", "null_q95", "p_value") if c in df]
        return [f"held-out R² (all targets) of {len(df)} maps, {self.n_perm} permutations:"] + table_lines(df[cols], max_rows=16)

    def to_dataframe(self) -> pd.DataFrame:
        return self.table.copy()

    def plot(self):
        import matplotlib.pyplot as plt

        df = self.table[self.table.target == "all"]
        panels = list(df.groupby(["kind", "direction"]))
        fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
        for ax, ((kind, direction), d) in zip(axes[0], panels):
            xs = np.arange(len(d))
            ax.bar(xs - 0.2, d.cv_r2, 0.4, label="real")
            ax.bar(xs + 0.2, d.null_mean, 0.4, label="shuffled (mean)")
            ax.errorbar(xs + 0.2, d.null_mean, yerr=[np.zeros(len(d)), d.null_q95 - d.null_mean],
                        fmt="none", color="k", lw=0.8)
            ax.set_xticks(xs, d.concept, rotation=45, fontsize=7)
            ax.axhline(0, color="grey", lw=0.5)
            ax.set_title(f"{kind}: {direction.replace('_', ' ')}", fontsize=8)
            ax.set_ylabel("held-out R²")
        axes[0, 0].legend(fontsize=7)
        fig.tight_layout()
        return fig


def token_regression(
    model,
    concepts: Sequence = tuple(CONCEPTS),
    *,
    kinds: Sequence[str] = ("embed", "unembed"),
    directions: Sequence[str] = ("features_to_vectors", "vectors_to_features"),
    n_perm: int = 50,
    n_folds: int = 5,
    seed: int = 0,
    progress: Optional[bool] = None,
) -> TokenRegressionResult:
    """(a) Ridge maps between words' token vectors and their concept features.

    ``features_to_vectors`` asks how much of the vectors' variance a sum of concept
    vectors explains (the theory's "vector = sum of concepts"); ``vectors_to_features``
    reads each feature off the vectors. Folds are by group (a lemma and its inflection
    never straddle train and test); the null permutes features across words. A progress bar
    counts the maps (concept x kind x direction, each with its ``n_perm`` null fits);
    ``progress=False`` silences it.
    """
    from embedwalk.progress import progress_bar

    bad = [d for d in directions if d not in ("features_to_vectors", "vectors_to_features")]
    if bad:
        raise EmbedwalkError(f"unknown directions {bad}; use features_to_vectors / vectors_to_features")
    rng = np.random.default_rng(seed)
    rows = []
    tables = list(_tables(concepts))
    bar = progress_bar(total=len(tables) * len(kinds) * len(directions), desc="token_regression", unit="map", progress=progress)
    for table in tables:
        folds = group_folds(table.group, n_folds, seed)
        feats = torch.tensor(table.features.to_numpy(), dtype=torch.float64)
        word_ids = np.arange(len(table))
        perms = [shuffle_labels_by_group(word_ids, word_ids, rng) for _ in range(n_perm)]
        for kind in kinds:
            vecs = token_vectors(model, table.words, kind).vectors.double()
            for direction in directions:
                if direction == "vectors_to_features":
                    # Permuted feature columns ride along as extra targets: X is the same, and
                    # per-target alpha selection makes each column its own independent fit.
                    q = feats.shape[1]
                    ys = torch.cat([feats] + [feats[p] for p in perms], 1)
                    r2, sst = _cv_r2(vecs, ys, folds, n_folds)
                    real, null = r2[:q], r2[q:].reshape(n_perm, q)
                    real_all = _overall(real, sst[:q])
                    null_all = np.array([_overall(nr, sst[:q]) for nr in null])
                    names = list(table.features.columns)
                else:
                    real_r2, sst = _cv_r2(feats, vecs, folds, n_folds)
                    real_all = _overall(real_r2, sst)
                    null_all = np.array([_overall(*_cv_r2(feats[p], vecs, folds, n_folds))
                                         for p in perms])
                    real, null, names = np.zeros(0), np.zeros((n_perm, 0)), []
                entries = [("all", real_all, null_all)] + [
                    (n, real[j], null[:, j]) for j, n in enumerate(names)]
                for target, r, nl in entries:
                    rows.append(dict(
                        concept=table.name, kind=kind, direction=direction, target=target,
                        n=len(table), cv_r2=float(r), null_mean=float(nl.mean()),
                        null_q95=float(np.quantile(nl, 0.95)),
                        p_value=float(permutation_p_value(r, nl)),
                    ))
                bar.update(1)
    bar.close()
    return TokenRegressionResult(pd.DataFrame(rows), n_perm, {"n_folds": n_folds, "seed": seed})


# --------------------------------------------------------------------------- (b) layer probes

DEFAULT_TEMPLATES = ("The word is {}", "I wrote down {}", "She kept thinking about {}")


@summary_repr
@dataclass
class LayerProbeResult:
    """Held-out probe accuracy per concept and readout point, with controls.

    ``table`` rows: concept, model ('trained' / 'random'), point ('embed', '0', ...), layer
    index, accuracy (``real``), its permutation p-value, the shuffled-label mean, the
    control-task accuracy and selectivity (real − control), majority-class chance.
    """

    table: pd.DataFrame
    points: list[str]
    meta: dict = field(default_factory=dict)

    def _headline(self) -> list[str]:
        from embedwalk._summary import table_lines

        df = self.table[self.table.model == "trained"]
        if df.empty:
            return [f"{len(self.points)} points, no trained-model rows"]
        best = df.loc[df.groupby("concept", sort=False)["real"].idxmax()]
        cols = [c for c in ("concept", "point", "real", "real_p", "control", "selectivity", "chance") if c in best]
        return [f"probe accuracy at {len(self.points)} points ({self.points[0]} .. {self.points[-1]}); "
                "best point per concept (trained model):"] + table_lines(best[cols], max_rows=16)

    def to_dataframe(self) -> pd.DataFrame:
        return self.table.copy()

    def first_readable(self, margin: float = 0.1, alpha: float = 0.05) -> pd.DataFrame:
        """Per concept, the first point where the trained model's probe beats its control
        task by ``margin`` with p < ``alpha`` (None where no point does)."""
        n_perm = self.meta.get("n_perm")
        if n_perm is not None and 1 / (1 + n_perm) >= alpha:
            raise EmbedwalkError(
                f"with n_perm={n_perm} the smallest possible permutation p-value is "
                f"{1 / (1 + n_perm):.3f}, so no point can reach p < {alpha}; rerun layer_probes with "
                f"n_perm >= {int(np.ceil(1 / alpha))} or pass a larger alpha"
            )
        out = []
        df = self.table[self.table.model == "trained"]
        for concept, d in df.groupby("concept", sort=False):
            ok = d[(d.selectivity >= margin) & (d.real_p < alpha)].sort_values("index")
            out.append({"concept": concept, "first_point": ok.point.iloc[0] if len(ok) else None,
                        "best_point": d.loc[d.real.idxmax(), "point"], "best_accuracy": d.real.max()})
        return pd.DataFrame(out)

    def plot(self):
        import matplotlib.pyplot as plt

        concepts = list(dict.fromkeys(self.table.concept))
        fig, axes = plt.subplots(1, len(concepts), figsize=(3.6 * len(concepts), 3), squeeze=False,
                                 sharey=True)
        for ax, c in zip(axes[0], concepts):
            d = self.table[self.table.concept == c]
            tr, rnd = d[d.model == "trained"], d[d.model == "random"]
            ax.plot(tr["index"], tr.real, marker=".", label="probe")
            ax.plot(tr["index"], tr.control, ls="--", label="control task")
            ax.plot(tr["index"], tr.shuffled, ls=":", label="shuffled labels")
            if len(rnd):
                ax.plot(rnd["index"], rnd.real, color="grey", label="random-init model")
            ax.axhline(tr.chance.iloc[0], color="k", lw=0.5)
            ax.set_title(c, fontsize=9)
            ax.set_xlabel("readout point (0 = embedding)")
        axes[0, 0].set_ylabel("held-out accuracy")
        axes[0, 0].legend(fontsize=6)
        fig.tight_layout()
        return fig


def _concept_texts(tables, templates):
    texts, spans = [], []
    for t in tables:
        start = len(texts)
        texts += [tpl.format(w) for w in t.words for tpl in templates]
        spans.append(slice(start, len(texts)))
    return texts, spans


def layer_probes(
    model,
    concepts: Sequence = ("number", "gender", "tense", "continent"),
    *,
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    method: str = "mass_mean",
    n_perm: int = 20,
    n_control: int = 5,
    n_folds: int = 5,
    random_baseline: bool = True,
    points: Optional[Sequence[int]] = None,
    batch_size: int = 32,
    seed: int = 0,
    progress: Optional[bool] = None,
    **probe_kwargs,
) -> LayerProbeResult:
    """(b) Probe each concept at every readout point of one pass over templated words.

    Each word is put at the end of every template (so its last token is the prompt's
    last) and the residual there is read at the embedding and after every block in ONE
    forward pass. Folds by group (lemma / pair); shuffles and the control task by word
    type (a word keeps its label across templates). ``random_baseline`` repeats the run
    on :func:`random_copy` (seed ``seed``).
    """
    from embedwalk.progress import progress_bar

    a = adapt(model)
    tables = _tables(concepts)
    for tpl in templates:
        if not tpl.rstrip().endswith("{}"):
            raise EmbedwalkError(f"template {tpl!r} must end with '{{}}' (the word's last token is read)")
    texts, spans = _concept_texts(tables, templates)
    labels_all = point_labels(a)
    keep = list(range(len(labels_all))) if points is None else [
        p if p >= 0 else p + len(labels_all) for p in points]
    models = [("trained", model)] + ([("random", random_copy(model, seed))] if random_baseline else [])
    rows = []
    for tag, m in models:
        (vecs,) = run(m, texts, readers=[PointsReader()], batch_size=batch_size, progress=progress)
        bar = progress_bar(total=len(tables) * len(keep), desc=f"layer_probes ({tag} model): probes", unit="probe", progress=progress)
        for table, span in zip(tables, spans):
            k = len(templates)
            y = np.repeat(table.label, k)
            groups = np.repeat(table.group, k)
            types = np.repeat(np.arange(len(table)), k)
            chance = np.bincount(y).max() / len(y)
            for idx in keep:
                x = vecs[span, idx]
                score = probe_cv_scorer(x, groups, len(table.classes), method, n_folds=n_folds,
                                        seed=seed, **probe_kwargs)
                if tag == "trained":
                    ctl = evaluate_controls(score, y, types, types, n_perm=n_perm,
                                            n_control=n_control, seed=seed).iloc[0]
                    extra = dict(real=ctl.real, real_p=ctl.real_p, shuffled=ctl.shuffled,
                                 control=ctl.control, selectivity=ctl.selectivity)
                else:
                    extra = dict(real=float(score(y)))
                rows.append(dict(concept=table.name, model=tag, point=labels_all[idx], index=idx,
                                 n=len(y), chance=chance, **extra))
                bar.update(1)
        bar.close()
        del vecs
    meta = dict(method=method, templates=list(templates), n_perm=n_perm, n_control=n_control)
    return LayerProbeResult(pd.DataFrame(rows), [labels_all[i] for i in keep], meta)


# --------------------------------------------------------------------------- log-likelihood scoring


class EmbedWriter(Writer):
    """Overwrites token embeddings (``hook_embed``) at chosen positions with given vectors.

    ``inserts[i]`` is ``(positions [k], vectors [k, d_model])`` for prompt i (positions
    count from the prompt's first real token). Writing ``hook_embed`` rather than
    ``blocks.0.hook_resid_pre`` is what Hugging Face's ``inputs_embeds`` does: a learned
    position vector (GPT-2) is still added for that slot, and rotary models (Llama) rotate
    queries and keys by position inside attention, so the inserted vector sits at its
    position exactly as a token embedding would. Vectors are cast to the model's dtype; one a
    16-bit model cannot hold (beyond float16's 65504) raises :class:`EmbedwalkError` naming the
    prompt, position, dimension and value (:func:`embedwalk.casting.cast_finite`).
    """

    def __init__(self, inserts: Sequence[Optional[tuple[Tensor, Tensor]]]):
        self.inserts = list(inserts)

    def hook_points(self, adapter):
        return ["hook_embed"]

    def write(self, name, value, ctx: Context):
        first = ctx.batch.mask.long().argmax(-1)
        out = value.clone()
        for r, i in enumerate(ctx.batch.prompt.tolist()):
            ins = self.inserts[i]
            if ins is None:
                continue
            pos, vec = ins
            out[r, first[r] + pos.to(value.device)] = cast_finite(
                vec.to(value.device), value.dtype, what=f"cannot insert the vectors for prompt {i}",
                locate=lambda idx, pos=pos: f"position {int(pos[idx[0]])}, dimension {idx[1]}",
                fix="The model's embeddings are this 16-bit dtype; load the model in float32 or bfloat16, or scale the vector",
            )
        return out


def _pad_rows(rows: list[list[int]], pad: int) -> tuple[Tensor, Tensor]:
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = True
    return tokens, mask


def continuation_logprobs(
    model,
    prefixes: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    *,
    inserts: Optional[Sequence[Optional[tuple[Tensor, Tensor]]]] = None,
    batch_size: int = 16,
    progress: Optional[bool] = None,
) -> Float[Tensor, "n"]:
    """Σ log p(continuation tokens | prefix) per row, from the model's own logits (float32).

    ``inserts`` (optional, per row) replaces the token embeddings at the given prefix
    positions with vectors (see :class:`EmbedWriter`); the prefix holds placeholder ids there.
    A vector beyond a 16-bit model's range raises :class:`EmbedwalkError` (see there).
    """
    a = adapt(model)
    if len(prefixes) != len(continuations):
        raise EmbedwalkError("prefixes and continuations must have the same length")
    if any(len(c) == 0 for c in continuations) or any(len(p) == 0 for p in prefixes):
        raise EmbedwalkError("every prefix and continuation needs at least one token")
    rows = [list(p) + list(c) for p, c in zip(prefixes, continuations)]
    tokens, mask = _pad_rows(rows, a.pad_token_id)
    out = torch.zeros(len(rows), dtype=torch.float32)

    def on_logits(logits, ctx: Context):
        logp = logits.float().log_softmax(-1)
        for r, i in enumerate(ctx.batch.prompt.tolist()):
            lp, lc = len(prefixes[i]), len(continuations[i])
            tgt = ctx.batch.tokens[r, lp: lp + lc]
            out[i] = logp[r, lp - 1: lp + lc - 1].gather(-1, tgt[:, None]).sum().cpu()

    writers = [] if inserts is None else [EmbedWriter(inserts)]
    run(a, tokens, attention_mask=mask, writers=writers, on_logits=on_logits,
        batch_size=batch_size, progress=progress)
    return out


# --------------------------------------------------------------------------- (c, d) multiple choice


@summary_repr
@dataclass
class MultipleChoiceResult:
    """Accuracies of every scoring method on a multiple-choice set.

    ``similarity[reduction][metric]`` is [n_items, n_points] of correct (bool): the
    concept-similarity test at every readout point. ``scores[method]`` is
    [n_items, n_options] of summed answer log-probs for 'full_context',
    'concept_generation' and 'question_only'. ``gold`` is [n_items].
    """

    items: list[dict]
    gold: Int[Tensor, "n"]
    points: list[str]
    similarity: dict
    scores: dict
    readout: int
    gen_readout: int
    reduction: str
    n_options: int
    meta: dict = field(default_factory=dict)

    def _headline(self) -> list[str]:
        from embedwalk._summary import table_lines

        return [f"{len(self.items)} items, {self.n_options} options each; accuracy by method:"] + table_lines(self.summary()[["method", "accuracy"]], max_rows=16)

    def accuracy(self, method: str) -> float:
        return (self.scores[method].argmax(-1) == self.gold).float().mean().item()

    def similarity_curve(self, reduction: str, metric: str = "dot") -> np.ndarray:
        return self.similarity[reduction][metric].float().mean(0).numpy()

    def summary(self) -> pd.DataFrame:
        rows = [dict(method="chance", accuracy=1.0 / self.n_options)]
        for how in self.similarity:
            for metric in self.similarity[how]:
                rows.append(dict(method=f"similarity[{how},{metric}]@{self.points[self.readout]}",
                                 accuracy=float(self.similarity_curve(how, metric)[self.readout])))
        for m in self.scores:
            rows.append(dict(method=m, accuracy=self.accuracy(m)))
        df = pd.DataFrame(rows)
        df["n_items"] = len(self.items)
        return df

    def to_dataframe(self) -> pd.DataFrame:
        """Long form: one row per (method, reduction, metric, point) accuracy."""
        rows = []
        for how, d in self.similarity.items():
            for metric in d:
                for k, acc in enumerate(self.similarity_curve(how, metric)):
                    rows.append(dict(method="similarity", reduction=how, metric=metric,
                                     point=self.points[k], index=k, accuracy=float(acc)))
        for m in self.scores:
            rows.append(dict(method=m, reduction=self.reduction if m == "concept_generation" else None,
                             metric="loglik", point=self.points[self.gen_readout] if m == "concept_generation" else None,
                             index=None, accuracy=self.accuracy(m)))
        rows.append(dict(method="chance", reduction=None, metric=None, point=None, index=None,
                         accuracy=1.0 / self.n_options))
        df = pd.DataFrame(rows)
        df["n_items"] = len(self.items)
        return df

    def per_category(self) -> pd.DataFrame:
        cats = np.array([it.get("category", "") for it in self.items])
        rows = []
        for c in dict.fromkeys(cats):
            sel = torch.from_numpy(cats == c)
            row = {"category": c, "n": int(sel.sum())}
            row[f"similarity[{self.reduction}]"] = self.similarity[self.reduction]["dot"][sel, self.readout].float().mean().item()
            for m in self.scores:
                row[m] = (self.scores[m][sel].argmax(-1) == self.gold[sel]).float().mean().item()
            rows.append(row)
        return pd.DataFrame(rows)

    def plot(self):
        import matplotlib.pyplot as plt

        x = np.arange(len(self.points))
        fig, ax = plt.subplots(figsize=(max(6, 0.18 * len(x) + 3.5), 3.5), constrained_layout=True)
        for how in self.similarity:
            ax.plot(x, self.similarity_curve(how), marker=".", label=f"concept similarity ({how}, dot)")
        styles = {"full_context": "-", "concept_generation": "--", "question_only": ":"}
        for m in self.scores:
            ax.axhline(self.accuracy(m), color="k", ls=styles.get(m, "-."), lw=1, label=m.replace("_", " "))
        ax.axhline(1.0 / self.n_options, color="red", lw=0.8, label=f"chance (1/{self.n_options})")
        ax.set_xticks(x, self.points, rotation=90 if len(x) > 12 else 0, fontsize=7)
        ax.set_xlabel("readout point of the concept vectors (embed, then after block l)")
        ax.set_ylabel("accuracy (fraction of items)")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"multiple choice: {len(self.items)} items, {self.n_options} options", fontsize=10)
        # outside the axes: the accuracy lines run across the whole width
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)
        return fig


def _check_items(items) -> list[dict]:
    if items is None:
        items = load_dataset("multiple_choice")
    items = list(items)
    if not items:
        raise EmbedwalkError("no multiple-choice items")
    n_opt = len(items[0]["options"])
    for it in items:
        for key in ("context", "question", "options", "answer"):
            if key not in it:
                raise EmbedwalkError(f"item {it.get('id', '?')} lacks {key!r}; items need "
                                     "context (list of str), question, options, answer")
        if len(it["options"]) != n_opt or not 0 <= int(it["answer"]) < n_opt:
            raise EmbedwalkError(f"item {it.get('id', '?')}: every item needs {n_opt} options and "
                                 "an answer index among them")
        if isinstance(it["context"], str) or not it["context"]:
            raise EmbedwalkError(f"item {it.get('id', '?')}: context must be a non-empty list of segments")
    return items


def _question_text(it) -> str:
    return f"Question: {it['question']}\nAnswer:"


def _readout_index(a, readout, name: str) -> int:
    """One readout's index (0 = embedding, l + 1 = output of block l) from an index or label."""
    from embedwalk.lenses.logit import _select_points

    if not isinstance(readout, (int, str)) or isinstance(readout, bool):
        raise EmbedwalkError(f"{name} must be one readout index or label, got {readout!r}")
    return _select_points(a.readout_points(), readout)[0].index


def multiple_choice(
    model,
    items: Optional[Sequence[dict]] = None,
    *,
    readout: Union[int, str] = -1,
    reduction: str = "mean",
    reductions: Sequence[str] = REDUCTIONS,
    gen_readout: Union[int, str] = 0,
    include_question: bool = True,
    methods: Sequence[str] = ("full_context", "concept_generation", "question_only"),
    batch_size: int = 16,
    progress: Optional[bool] = None,
    layer=None,
    gen_layer=None,
) -> MultipleChoiceResult:
    """(c) the concept-similarity test and (d) the generation test, with baselines.

    (c) Each context segment (and, with ``include_question``, the question) is encoded
    alone; its token vectors at a readout point are reduced to one concept vector (every
    reduction in ``reductions`` and every point come from the same single pass); the
    segments' vectors are averaged and the option whose own concept vector (the option
    text encoded alone) has the largest dot product (also reported: cosine) wins.
    ``readout`` picks the point for the summary: a readout index (0 = embedding, l + 1 = the
    output of block l, negative from the end: ``-1`` = the last block) or label ('embed', '3'),
    as ``logit_lens(readouts=)``. The old ``layer=`` / ``gen_layer=`` (which counted readouts,
    not blocks) are refused, naming ``readout=`` / ``gen_readout=``.

    (d) ``concept_generation``: BOS, then one input embedding per context segment (its
    ``reduction`` concept vector at readout ``gen_readout``; 0 = token-embedding space, the
    only space in which a vector is a natural input), then the question's tokens; each
    option is scored by its summed log-probability. Baselines: ``full_context`` (the
    context text itself in place of the vectors) and ``question_only`` (no context).
    """
    a = adapt(model)
    items = _check_items(items)
    if reduction not in reductions:
        raise EmbedwalkError(f"reduction {reduction!r} must be one of reductions={list(reductions)}")
    refuse_layers("multiple_choice", layer, old="layer", new="readout")
    refuse_layers("multiple_choice", gen_layer, old="gen_layer", new="gen_readout")
    n_points = a.n_layers + 1
    readout, gen_readout = _readout_index(a, readout, "readout"), _readout_index(a, gen_readout, "gen_readout")
    from embedwalk.progress import progress_scope

    texts: dict[str, int] = {}
    for it in items:
        for s in list(it["context"]) + [it["question"]] + list(it["options"]):
            texts.setdefault(s, len(texts))
    # One bar, one ETA, for the segment pass and every scoring pass (prompts forwarded).
    total = len(texts) + len(methods) * len(items) * len(items[0]["options"])
    with progress_scope(total, f"multiple_choice ({len(items)} items)", progress=progress):
        return _multiple_choice(a, model, items, texts, readout=readout, reduction=reduction, reductions=reductions,
                                gen_readout=gen_readout, include_question=include_question, methods=methods,
                                batch_size=batch_size, progress=progress, n_points=n_points)


def _multiple_choice(a, model, items, texts, *, readout, reduction, reductions, gen_readout, include_question, methods,
                     batch_size, progress, n_points) -> MultipleChoiceResult:
    t0 = time.perf_counter()
    # One pass encodes every distinct segment, question and option alone.
    (seg,) = run(a, list(texts), readers=[SegmentReader(reductions)], batch_size=batch_size,
                 progress=progress)
    gold = torch.tensor([int(it["answer"]) for it in items])
    similarity = {}
    for how in reductions:
        v = seg[how]  # [n_texts, points, d]
        ctx_ids = [[texts[s] for s in it["context"]] + ([texts[it["question"]]] if include_question else [])
                   for it in items]
        ctx = torch.stack([v[ids].mean(0) for ids in ctx_ids])  # [items, points, d]
        opt = torch.stack([v[[texts[o] for o in it["options"]]] for it in items])  # [items, opts, points, d]
        dot = torch.einsum("ipd,iopd->iop", ctx, opt)
        cos = dot / (ctx.norm(dim=-1)[:, None] * opt.norm(dim=-1)).clamp_min(1e-12)
        similarity[how] = {m: (s.argmax(1) == gold[:, None]) for m, s in (("dot", dot), ("cos", cos))}
    t_sim = time.perf_counter() - t0

    bos = a.tokenizer.bos_token_id if a.tokenizer is not None else None
    has_bos = bos is not None and len(a.to_tokens("x")) > len(a.to_tokens("x", prepend_bos=False))
    head = [int(bos)] if has_bos else []
    n_opt = len(items[0]["options"])
    opt_ids = [[a.to_tokens(" " + o, prepend_bos=False).tolist() for o in it["options"]] for it in items]
    scores = {}
    for method in methods:
        prefixes, inserts = [], []
        for it in items:
            q = a.to_tokens("\n" + _question_text(it), prepend_bos=False).tolist()
            if method == "full_context":
                p = a.to_tokens(" ".join(it["context"]) + "\n" + _question_text(it)).tolist()
                ins = None
            elif method == "question_only":
                p = a.to_tokens(_question_text(it)).tolist()
                ins = None
            elif method == "concept_generation":
                vecs = seg[reduction][[texts[s] for s in it["context"]], gen_readout]
                k = vecs.shape[0]
                p = head + [a.pad_token_id] * k + q
                ins = (torch.arange(len(head), len(head) + k), vecs)
            else:
                raise EmbedwalkError(f"unknown method {method!r}; use full_context, "
                                     "concept_generation or question_only")
            prefixes += [p] * n_opt
            inserts += [ins] * n_opt
        conts = [c for ids in opt_ids for c in ids]
        lp = continuation_logprobs(model, prefixes, conts, batch_size=batch_size, progress=progress,
                                   inserts=inserts if method == "concept_generation" else None)
        scores[method] = lp.reshape(len(items), n_opt)
    meta = dict(include_question=include_question, seconds_similarity=t_sim,
                seconds_total=time.perf_counter() - t0)
    return MultipleChoiceResult(items, gold, point_labels(a), similarity, scores, readout, gen_readout,
                                reduction, n_opt, meta)


# --------------------------------------------------------------------------- from an activation store


def _targets_from_store(store, y: str):
    """``y`` is a stored hook (a vector target) or ``meta:col[,col...]`` (metadata columns;
    a non-numeric column becomes one-hot over the values the store holds)."""
    if not y.startswith("meta:"):
        name = store.resolve(y)[0]
        return (lambda b: b.vectors[name].float()), [f"{name}[{i}]" for i in range(store.d_model)], [name]
    cols = [c.strip() for c in y[5:].split(",") if c.strip()]
    table = store.prompts
    parts, names = [], []
    for c in cols:
        if c not in table.columns:
            raise EmbedwalkError(f"no metadata column {c!r} in the store; it has "
                                 f"{[k for k in table.columns if k not in ('prompt', 'shard', 'row_start', 'n_rows')]}")
        values = table[c]
        if pd.api.types.is_numeric_dtype(values):
            parts.append((c, None))
            names.append(c)
        else:
            cats = sorted(values.dropna().astype(str).unique())
            parts.append((c, cats))
            names += [f"{c}={v}" for v in cats]

    def get(b):
        out = []
        for c, cats in parts:
            col = b.meta[c]
            if cats is None:
                out.append(torch.tensor(col, dtype=torch.float64)[:, None])
            else:
                idx = torch.tensor([cats.index(str(v)) for v in col])
                out.append(torch.nn.functional.one_hot(idx, len(cats)).double())
        return torch.cat(out, 1)

    return get, names, []


def fit_from_store(
    store,
    x: str,
    y: str,
    *,
    reverse: bool = False,
    group: str = "prompt",
    n_folds: int = 5,
    alphas: Optional[Sequence[float]] = None,
    where=None,
    batch_size: int = 4096,
    seed: int = 0,
):
    """Stream a store once into per-fold statistics and fit a CV ridge regression.

    ``x`` is a stored hook; ``y`` another hook or ``meta:col[,col]``. ``reverse`` swaps the
    sides (features → vectors). Folds by ``group``: 'prompt' or a metadata column. Returns
    ``(RidgeFit, info)`` where info has rows, seconds and rows/s of the pass.
    """
    from embedwalk.store import open_store

    store = open_store(store) if not hasattr(store, "batches") else store
    xname = store.resolve(x)[0]
    target, names, extra = _targets_from_store(store, y)
    fs = FoldedStats(n_folds, seed, source=store)  # the manifest's model and residual basis
    t0, rows = time.perf_counter(), 0
    for b in store.batches([xname] + extra, batch_size=batch_size, where=where):
        if group == "prompt":
            g = b.prompt.numpy()
        else:
            if group not in b.meta:
                raise EmbedwalkError(f"no metadata column {group!r} to group folds by")
            g = np.asarray([str(v) for v in b.meta[group]])
        xs, ys = b.vectors[xname], target(b)
        if reverse:
            xs, ys = ys, xs
        fs.update(xs, ys, groups=g)
        rows += len(b)
    if rows == 0:
        raise EmbedwalkError("no rows matched in the store")
    secs = time.perf_counter() - t0
    xnames = [f"{xname}[{i}]" for i in range(store.d_model)]
    fit = fit_ridge(fs, alphas, target_names=xnames if reverse else names,
                    feature_names=names if reverse else xnames)
    return fit, {"rows": rows, "seconds_pass": secs, "rows_per_s": rows / max(secs, 1e-9)}
