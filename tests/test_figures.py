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
