"""Long calls show one progress bar with an ETA; ``progress=False`` silences every bar."""

import re

import pytest

import embedwalk as ew
from embedwalk import progress as progress_mod
from embedwalk.association.measure import downstream, sweep
from embedwalk.concepts.experiments import multiple_choice
from embedwalk.store import cache_activations
from embedwalk.errors import EmbedwalkError
from embedwalk.progress import DELAY_ENV, progress_scope

ITEMS = [
    {"id": "t0", "context": ["w5 w6 w7", "w8 w9"], "question": "w10 w11", "options": ["w12", "w13 w14", "w15"], "answer": 1},
    {"id": "t1", "context": ["w20 w21", "w22"], "question": "w23", "options": ["w24", "w25", "w26 w27"], "answer": 2},
]
TEXTS = [f"w{i} w{i + 1} w{i + 2} w{i + 3}" for i in range(5, 25)]


@pytest.fixture(autouse=True)
def bars_at_once(monkeypatch):
    """Tiny models answer in milliseconds: show every bar from the start (the default waits 5 s)."""
    monkeypatch.setenv(DELAY_ENV, "0")


def _bars(err: str) -> dict:
    """Final state of every bar in tqdm's stderr: description -> (done, total). Prompt bars
    count fractions of a batch and print one decimal ("20.0/20")."""
    out = {}
    for desc, done, total in re.findall(r"([^\r\n]*?): +\d+%\|[^|]*\| (\d+)(?:\.\d)?/(\d+)", err):
        out[desc.strip()] = (int(done), int(total))
    return out


def test_multiple_choice_shows_one_bar_for_all_passes(tiny_arch, capfd):
    multiple_choice(tiny_arch, ITEMS, readout=1, gen_readout=0, batch_size=2)
    bars = _bars(capfd.readouterr().err)
    n_texts = len({s for it in ITEMS for s in it["context"] + [it["question"]] + it["options"]})
    assert bars == {"multiple_choice (2 items)": (n_texts + 3 * 2 * 3, n_texts + 3 * 2 * 3)}
    multiple_choice(tiny_arch, ITEMS, readout=1, gen_readout=0, batch_size=2, progress=False)
    assert capfd.readouterr().err == ""


@pytest.mark.filterwarnings("error::tqdm.TqdmWarning")  # summed fractions must not pass the total
def test_tuned_lens_training_counts_prompts_of_every_epoch(tiny_arch, capfd):
    ew.train_tuned_lens(tiny_arch, TEXTS, epochs=2, batch_size=4)
    assert _bars(capfd.readouterr().err) == {"train_tuned_lens (2 epochs)": (40, 40)}
    ew.train_tuned_lens(tiny_arch, TEXTS, epochs=2, batch_size=4, progress=False)
    assert capfd.readouterr().err == ""


def test_single_passes_and_nested_scopes(tiny_arch, capfd):
    ew.logit_lens(tiny_arch, TEXTS, batch_size=4)
    assert _bars(capfd.readouterr().err) == {"embedwalk": (20, 20)}
    ew.logit_lens(tiny_arch, TEXTS, batch_size=4, progress=False)
    ew.decoding_walk(tiny_arch, "w5 w6", max_new_tokens=3, progress=False)
    assert capfd.readouterr().err == ""
    ew.decoding_walk(tiny_arch, "w5 w6", max_new_tokens=3)
    assert _bars(capfd.readouterr().err) == {"decoding_walk": (3, 3)}
    with progress_scope(40, "outer", progress=False):  # a silenced scope silences what runs inside
        ew.logit_lens(tiny_arch, TEXTS, batch_size=4)
    assert capfd.readouterr().err == ""


class _Recorder:
    """Every value a bar's count took, and whether its line showed an ETA; installed in place
    of tqdm, with refreshes on every update (tqdm's 0.1 s minimum would hide a tiny model's)."""

    def __init__(self, monkeypatch):
        from tqdm import tqdm

        self.counts, self.lines = [], []
        rec = self

        class Bar(tqdm):
            def __init__(self, *args, **kwargs):
                kwargs.update(mininterval=0, miniters=0)
                super().__init__(*args, **kwargs)

            def update(self, n=1):
                super().update(n)
                rec.counts.append(self.n)
                rec.lines.append(str(self))

        monkeypatch.setattr(progress_mod, "_tqdm_class", lambda: Bar)


def test_a_call_of_one_batch_shows_a_bar_that_advances_inside_the_batch(tiny_arch, monkeypatch, capfd):
    # Issue 22: logit_lens of 7 paragraphs in one batch ran 193 s without a word. A bar that
    # counted batches could not move before the end; this one moves with the readout's GEMMs.
    rec = _Recorder(monkeypatch)
    ew.logit_lens(tiny_arch, TEXTS[:3], batch_size=8, chunk_size=4)
    inside = [c for c in rec.counts if 0 < c < 3]
    assert len(inside) >= 5, rec.counts
    # The count is a sum of fractions of the batch: whole again at the end up to float64
    # rounding of a few dozen additions (the bar itself is rounded back to 3 when it closes).
    assert rec.counts == sorted(rec.counts) and rec.counts[-1] == pytest.approx(3, rel=64 * 2**-52)
    assert any(re.search(r"<\d\d:\d\d", line) for line in rec.lines[1:])  # an ETA ("<00:01")
    assert _bars(capfd.readouterr().err) == {"embedwalk": (3, 3)}


@pytest.mark.parametrize("call", ["logit_lens", "association_bias", "decompose", "walk_lens", "downstream", "sweep",
                                  "cache_activations", "train_tuned_lens"])
def test_every_long_call_shows_a_bar_even_for_one_prompt(tiny_arch, call, monkeypatch, capfd, tmp_path):
    calls = {
        "logit_lens": lambda **kw: ew.logit_lens(tiny_arch, "w5 w6 w7 w8", **kw),
        "association_bias": lambda **kw: ew.association_bias(tiny_arch, "w5 w6 w7 w8", **kw),
        "decompose": lambda **kw: ew.decompose(tiny_arch, "w5 w6 w7 w8", **kw),
        "walk_lens": lambda **kw: ew.walk_lens(tiny_arch, "w5 w6 w7 w8", **kw),
        "downstream": lambda **kw: downstream(tiny_arch, "w5 w6 w7 w8", **kw),
        "sweep": lambda **kw: sweep(tiny_arch, "w5 w6 w7 w8", units=("all",), **kw),
        "cache_activations": lambda **kw: cache_activations(tiny_arch, ["w5 w6 w7 w8"], tmp_path / f"s{len(kw)}",
                                                               hooks=["final"], **kw),
        "train_tuned_lens": lambda **kw: ew.train_tuned_lens(tiny_arch, ["w5 w6 w7 w8"], epochs=1, **kw),
    }
    rec = _Recorder(monkeypatch)
    calls[call]()
    assert rec.counts, f"{call} on one prompt showed no progress bar"
    if call in ("logit_lens", "association_bias", "decompose", "walk_lens", "downstream"):
        # the bar moves while the single batch is being worked on, not only when it ends
        assert any(0 < c < rec.counts[-1] and c != int(c) for c in rec.counts), (call, rec.counts)
    capfd.readouterr()
    rec.counts.clear()
    calls[call](progress=False)
    assert rec.counts == [] and capfd.readouterr().err == ""


def test_quick_calls_stay_quiet_until_the_delay(tiny_arch, monkeypatch, capfd):
    monkeypatch.delenv(DELAY_ENV)
    assert progress_mod.show_after() == 5.0 and progress_mod.show_after(True) == 0.0
    ew.logit_lens(tiny_arch, TEXTS, batch_size=4)  # milliseconds: under the default 5 s
    assert capfd.readouterr().err == ""
    ew.logit_lens(tiny_arch, "w5 w6", progress=True)  # True shows the bar at once
    assert _bars(capfd.readouterr().err) == {"embedwalk": (1, 1)}
    monkeypatch.setenv(DELAY_ENV, "soon")
    with pytest.raises(EmbedwalkError, match=DELAY_ENV):
        ew.logit_lens(tiny_arch, "w5 w6")


def test_a_batch_share_never_passes_the_bar_total():
    """Fractions of a batch summed over stages can pass the total by a rounding error (3 +
    3.6e-15 for three one-prompt batches in 11 + 11 steps), which tqdm clamps with a warning;
    the share stops at the total."""
    from embedwalk.progress import BatchWork

    class Bar:
        total, n = 3, 0.0

        def update(self, amount):
            self.n += amount
            assert self.n <= self.total, self.n

    bar = Bar()
    for _ in range(3):
        work = BatchWork(bar, 1)
        for lo, hi in ((0.0, 0.9), (0.9, 1.0)):
            work.stage(lo, hi)
            for i in range(1, 12):
                work.advance(i, 11)
        work.finish()
    assert bar.n == 3
