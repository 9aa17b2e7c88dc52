"""Long calls show one progress bar with an ETA; ``progress=False`` silences every bar."""

import re


import embedwalk as ew
from embedwalk.concepts.experiments import multiple_choice
from embedwalk.progress import progress_scope

ITEMS = [
    {"id": "t0", "context": ["w5 w6 w7", "w8 w9"], "question": "w10 w11", "options": ["w12", "w13 w14", "w15"], "answer": 1},
    {"id": "t1", "context": ["w20 w21", "w22"], "question": "w23", "options": ["w24", "w25", "w26 w27"], "answer": 2},
]
TEXTS = [f"w{i} w{i + 1} w{i + 2} w{i + 3}" for i in range(5, 25)]


def _bars(err: str) -> dict:
    """Final state of every bar in tqdm's stderr: description -> (done, total)."""
    out = {}
    for desc, done, total in re.findall(r"([^\r\n]*?): +\d+%\|[^|]*\| (\d+)/(\d+)", err):
        out[desc.strip()] = (int(done), int(total))
    return out


def test_multiple_choice_shows_one_bar_for_all_passes(tiny_arch, capfd):
    multiple_choice(tiny_arch, ITEMS, readout=1, gen_readout=0, batch_size=2)
    bars = _bars(capfd.readouterr().err)
    n_texts = len({s for it in ITEMS for s in it["context"] + [it["question"]] + it["options"]})
    assert bars == {"multiple_choice (2 items)": (n_texts + 3 * 2 * 3, n_texts + 3 * 2 * 3)}
    multiple_choice(tiny_arch, ITEMS, readout=1, gen_readout=0, batch_size=2, progress=False)
    assert capfd.readouterr().err == ""


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
