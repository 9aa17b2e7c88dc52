"""Figures are paper-ready: honest colour scales with units, missing cells marked, no
overlapping or clipped labels, visible whitespace; interactive views match the data.

Checked on the artists (norms, labels, bounding boxes), never on pixels.
"""

import itertools

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

import embedwalk as ew  # noqa: E402
from embedwalk.errors import EmbedwalkError  # noqa: E402
from embedwalk.figures import ratio_norm, visible_token  # noqa: E402

TEXTS = ["w5 w6 w7 w8 w9 w10", "w11 w12 w13"]


def _boxes(fig, artists):
    r = fig.canvas.get_renderer()
    return [a.get_window_extent(r) for a in artists if a.get_visible() and a.get_text()]


def _no_overlap(boxes):
    for a, b in itertools.combinations(boxes, 2):
        assert not a.overlaps(b), (a, b)


@pytest.fixture(scope="module")
def lens(tiny_arch):
    return ew.logit_lens(tiny_arch, TEXTS, progress=False)


def test_visible_token():
    assert visible_token(" Paris") == "␣Paris"
    assert visible_token("\n\n") == "\\n\\n"
    assert visible_token("\t") == "\\t"
    assert visible_token("") == "∅"
    assert visible_token(" a long token", 6) == "␣a␣lo…"


def test_kl_heatmap_log_scale_spans_the_data(lens):
    fig = lens.plot("kl_to_final")
    ax = fig.axes[0]
    im = ax.images[0]
    kl = lens.kl_to_final[:, lens.prompt == 0].double().numpy()
    assert isinstance(im.norm, LogNorm)
    assert im.norm.vmax == pytest.approx(kl.max(), rel=1e-6)
    # the embedding row does not take the scale over: the log range reaches down to the small values
    assert im.norm.vmin <= np.sort(kl[kl > 0])[len(kl[kl > 0]) // 2]
    cbar_label = fig.axes[1].get_ylabel()
    assert "KL" in cbar_label and "nats" in cbar_label and "log" in cbar_label
    _no_overlap(_boxes(fig, ax.get_yticklabels()))
    _no_overlap(_boxes(fig, ax.get_xticklabels()))
    plt.close(fig)


def test_rank_heatmap_log_scale_and_no_target_cells_hatched(lens):
    fig = lens.plot("target_rank")
    ax = fig.axes[0]
    im = ax.images[0]
    assert isinstance(im.norm, LogNorm) and im.norm.vmin == 1
    R = len(lens.labels)
    hatched = [p for p in ax.patches if isinstance(p, Rectangle) and p.get_hatch()]
    assert len(hatched) == R  # the last position of prompt 0 has no next-token target, at every readout
    last_col = int((lens.prompt == 0).sum()) - 1
    assert {round(p.get_x() + 0.5) for p in hatched} == {last_col}
    assert np.ma.getmaskarray(im.get_array())[:, last_col].all()  # never painted as a rank
    assert "hatched: no target" in fig.axes[1].get_ylabel()
    plt.close(fig)


def test_walk_labels_are_legible(tiny_arch):
    walk = ew.walk_lens(tiny_arch, TEXTS[0], progress=False)
    fig = walk.plot()
    ax = fig.axes[0]
    texts = [t for t in ax.texts]
    assert texts, "the walk has labels"
    boxes = _boxes(fig, texts)
    _no_overlap(boxes)
    frame = ax.get_window_extent(fig.canvas.get_renderer())
    assert all(frame.x0 <= b.x0 and b.x1 <= frame.x1 and frame.y0 <= b.y0 and b.y1 <= frame.y1 for b in boxes)
    assert "block" in fig.axes[1].get_ylabel()  # the depth colour bar says what it shows
    plt.close(fig)


def test_decoding_walk_labels_title_and_whitespace(tiny_arch):
    gen = ew.decoding_walk(tiny_arch, "w5 w6", max_new_tokens=6, progress=False)
    gen.token_strs[int(gen.chosen[0])] = "\n"  # a newline token must show as \n, never break a label
    fig = gen.plot()
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.texts]
    assert "0: \\n" in labels and not any("\n" in s for s in labels)
    _no_overlap(_boxes(fig, ax.texts))
    title = ax.title
    assert "\\n" in title.get_text().split("\n")[0]
    fig.savefig(__import__("io").BytesIO(), bbox_inches="tight")
    r = fig.canvas.get_renderer()
    assert title.get_window_extent(r).x0 >= fig.bbox.x0 - 1 and title.get_window_extent(r).x1 <= fig.bbox.x1 + 1
    plt.close(fig)


def test_head_priority_ratio_is_centred_on_one(tiny_arch):
    from embedwalk.priority.model import head_priority

    res = head_priority(tiny_arch, ["w5 w6 w7 w5 w6 w7 w5 w6 w8 w5 w6 w7"], progress=False)
    fig = res.plot("ratio")
    im = fig.axes[0].images[0]
    assert im.cmap.name == "RdBu_r"
    assert im.norm.vmin * im.norm.vmax == pytest.approx(1.0)  # log-symmetric: 1 sits in the middle
    r = res.scores["ratio"].numpy()
    assert im.norm.vmax >= np.nanmax(r) - 1e-9 and im.norm.vmin <= np.nanmin(r) + 1e-9
    assert "1 = no preference" in fig.axes[1].get_ylabel()
    plt.close(fig)
    assert ratio_norm(np.array([0.25, 1.0, 2.0])).vmax == pytest.approx(4.0)


def test_interactive_views_need_plotly_or_say_so(lens, tiny_arch):
    try:
        import plotly  # noqa: F401
    except ImportError:
        with pytest.raises(EmbedwalkError, match=r"embedwalk\[interactive\]"):
            lens.plot(interactive=True)
        return
    fig = lens.plot("kl_to_final", interactive=True)
    heat = fig.data[0]
    df = lens.to_dataframe()
    df0 = df[df.prompt == 0]
    for r, label in enumerate(lens.labels):
        for c, (_, row) in enumerate(df0[df0.layer == label].sort_values("pos").iterrows()):
            text = heat.text[r][c]
            assert f"readout {label}, pos {row.pos}" in text
            assert f"KL {row.kl_to_final:.4g} nats" in text
            assert f"{visible_token(row.top1_token)} {row.top1_prob:.3f}" in text
    walk = ew.walk_lens(tiny_arch, TEXTS[0], progress=False)
    wfig = walk.plot(interactive=True)
    wdf = walk.to_dataframe()
    assert len(wfig.data[0].text) == len(walk.labels)
    for j, label in enumerate(walk.labels):
        assert f"point {label}<br>" in wfig.data[0].text[j]
    del wdf


def test_association_bias_colour_bars_have_units(tiny_arch):
    from embedwalk.association.measure import association_bias

    res = association_bias(tiny_arch, TEXTS)
    fig = res.plot()
    assert isinstance(fig.axes[0].images[0].norm, LogNorm)
    labels = [a.get_ylabel() for a in fig.axes[2:]]
    assert any("distance to uniform" in s for s in labels) and any("uniform" in s and "own position" in s for s in labels)
    plt.close(fig)


def test_sweep_plot_integer_ticks_and_signed_map_centred_on_zero(tiny_arch):
    from embedwalk.association.measure import sweep

    res = sweep(tiny_arch, TEXTS)
    fig = res.plot("delta_loss")
    bars, grid = fig.axes[0], fig.axes[1]
    for axis in (bars.xaxis, grid.xaxis, grid.yaxis):
        ticks = [t for t in axis.get_ticklocs() if axis.get_view_interval().min() <= t <= axis.get_view_interval().max()]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
    im = grid.images[0]
    values = res.head_matrix("delta_loss").numpy()
    assert im.get_cmap().name == "RdBu_r" and im.norm.vmin == -im.norm.vmax
    assert im.norm.vmax >= abs(values).max() - 1e-9 and (values > 0).any() and (values < 0).any()  # both signs drawn
    assert "Δ loss" in fig.axes[2].get_ylabel()  # the colour bar says what and in which unit
    plt.close(fig)
    fig = res.plot("kl")  # unsigned: a sequential map
    assert fig.axes[1].images[0].get_cmap().name == "magma"
    plt.close(fig)


def _inside_figure(fig, artists):
    """Every artist's box lies inside the saved (tight) figure: nothing is clipped."""
    import io

    fig.savefig(io.BytesIO(), bbox_inches="tight")
    r = fig.canvas.get_renderer()
    for a in artists:
        b = a.get_window_extent(r)
        assert fig.bbox.x0 - 1 <= b.x0 and b.x1 <= fig.bbox.x1 + 1, (a, b)


def _legend_clear_of_data(fig, ax):
    """A legend placed outside the axes never hides a line."""
    r = fig.canvas.get_renderer()
    assert not ax.get_legend().get_window_extent(r).overlaps(ax.get_window_extent(r))


def test_ridge_fit_plot_axes_say_what_they_show():
    import torch

    from embedwalk.concepts.ridge import fit_ridge
    from embedwalk.concepts.stats import FoldedStats

    rng = np.random.default_rng(0)
    x = rng.normal(size=(240, 6))
    y = x @ rng.normal(size=(6, 3)) + rng.normal(size=(240, 3)) * np.array([0.5, 2, 8])
    fs = FoldedStats(4, 0).update(torch.tensor(x), torch.tensor(y), groups=np.arange(240) // 4)
    fit = fit_ridge(fs, target_names=[" plural", "\n", "tense"])
    ax = fit.plot()
    fig = ax.figure
    assert ax.get_xscale() == "log" and "alpha" in ax.get_xlabel() and "R²" in ax.get_ylabel()
    assert fig.get_constrained_layout()
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "␣plural" in labels and "\\n" in labels and "chosen alpha per target" in labels
    _legend_clear_of_data(fig, ax)
    _inside_figure(fig, [ax.title, ax.get_legend()])
    plt.close(fig)


def test_token_and_layer_vector_plots(tiny_arch):
    from embedwalk.concepts.features import context_vectors, token_vectors

    tv = token_vectors(tiny_arch, ["w5", "w6", "w7", "w8", "w9"])
    fig = tv.plot()
    ax = fig.axes[0]
    assert "L2 norm" in ax.get_xlabel() and "W_E" in ax.get_xlabel()
    assert all(float(t).is_integer() for t in ax.get_yticks())  # a count of words
    norms = tv.vectors.norm(dim=-1).numpy()
    named = {t.get_text() for t in ax.texts}
    assert {tv.words[int(norms.argmin())], tv.words[int(norms.argmax())]} <= named  # the extremes are named
    _no_overlap(_boxes(fig, ax.texts))
    _inside_figure(fig, [ax.title])
    plt.close(fig)

    lv = context_vectors(tiny_arch, TEXTS, progress=False)
    fig = lv.plot()
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == lv.points
    assert "L2 norm" in ax.get_ylabel() and "readout point" in ax.get_xlabel()
    mean = lv.vectors.norm(dim=-1).mean(0).numpy()
    np.testing.assert_allclose(ax.lines[0].get_ydata(), mean, rtol=1e-5)
    _no_overlap(_boxes(fig, ax.get_xticklabels()))
    _inside_figure(fig, [ax.title])
    plt.close(fig)


def test_store_plot_labels(tiny_arch, tmp_path):
    from embedwalk.store import cache_activations, open_store

    cache_activations(tiny_arch, TEXTS, tmp_path / "a-rather-long-store-folder-name-for-a-paper", dtype="float32", progress=False)
    store = open_store(tmp_path / "a-rather-long-store-folder-name-for-a-paper")
    fig = store.plot()
    ax = fig.axes[0]
    assert "L2 norm" in ax.get_ylabel() and "layer" in ax.get_xlabel()
    _no_overlap(_boxes(fig, ax.get_xticklabels()))
    _inside_figure(fig, [ax.title] + ax.get_xticklabels())
    plt.close(fig)


def _mc_result():
    import torch

    from embedwalk.concepts.experiments import MultipleChoiceResult

    g = torch.Generator().manual_seed(0)
    n, points = 20, ["embed"] + [str(i) for i in range(24)]
    gold = torch.randint(0, 4, (n,), generator=g)
    return MultipleChoiceResult(
        items=[{"id": i} for i in range(n)], gold=gold, points=points,
        similarity={"mean": {"dot": torch.rand(n, len(points), generator=g) < 0.5}},
        scores={m: torch.randn(n, 4, generator=g) for m in ("full_context", "concept_generation", "question_only")},
        readout=10, gen_readout=10, reduction="mean", n_options=4)


def test_multiple_choice_plot_legend_outside_and_ticks_legible():
    res = _mc_result()
    fig = res.plot()
    ax = fig.axes[0]
    assert ax.get_ylim() == pytest.approx((0, 1.02)) and "fraction of items" in ax.get_ylabel()
    assert "chance (1/4)" in [t.get_text() for t in ax.get_legend().get_texts()]
    _legend_clear_of_data(fig, ax)
    _no_overlap(_boxes(fig, ax.get_xticklabels()))
    _inside_figure(fig, [ax.title, ax.get_legend()])
    plt.close(fig)


def test_retrain_plot_title_not_clipped():
    from embedwalk.association.retrain import RetrainResult

    res = RetrainResult(steps=[0, 100, 200, 300], standard=[10.4, 6.1, 5.2, 4.9], uniform=[10.4, 6.6, 5.9, 5.6])
    fig = res.plot()
    ax = fig.axes[0]
    assert "nats/token" in ax.get_ylabel() and f"{res.gap:+.3f} nats/token" in ax.get_title()
    _inside_figure(fig, [ax.title])
    plt.close(fig)


def test_reproduction_plot_panels_have_units(tmp_path):
    from embedwalk.priority.reproduce import reproduce

    res = reproduce("cyclic", n_datasets=2, iterations=40, seed=0, log_every=10, progress=False)
    fig = res.plot(tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 0
    assert fig.get_constrained_layout()
    for ax in fig.axes:
        assert ax.get_ylabel() and ax.get_xlabel() == "iteration"
    _no_overlap(_boxes(fig, [ax.title for ax in fig.axes]))
    _inside_figure(fig, [ax.title for ax in fig.axes])
    plt.close(fig)


def test_decompose_plot_units_legend_and_visible_tokens(tiny_arch):
    d = ew.decompose(tiny_arch, "w5 w6 w7 w8", token="w9")
    d.str_tokens[d.position] = " "  # whitespace must be drawn, never a blank
    fig = d.plot()
    ax1, ax2 = fig.axes[:2]
    assert "(logits)" in ax1.get_xlabel() and "(logits)" in ax2.get_ylabel()
    assert "'␣'" in ax2.get_title()
    assert [t.get_text() for t in ax1.get_legend().get_texts()] == ["raises the logit", "lowers it"]
    assert fig.get_constrained_layout()
    _no_overlap(_boxes(fig, [ax1.title, ax2.title]))
    _no_overlap(_boxes(fig, ax1.get_yticklabels()))
    _inside_figure(fig, [ax1.title, ax2.title])
    plt.close(fig)
