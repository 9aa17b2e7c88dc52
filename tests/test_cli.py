"""The model-loading subcommands: shared --model/--generation/--device options, and tables equal
to what the Python API returns for the same model and text."""

import numpy as np
import pandas as pd
import pytest

import embedwalk as ew
from embedwalk.cli import main
from embedwalk.testing import installed_generation

TEXTS = ["w5 w6 w7 w8 w9", "w10 w11 w12"]
MODEL = ["--model", "tiny-llama", "--generation", installed_generation(), "--device", "cpu"]


@pytest.fixture(scope="module")
def model():
    return ew.load_model("tiny-llama", device="cpu")


def test_bias_measure_and_sweep(model, tmp_path, capsys):
    from embedwalk.association import association_bias, downstream

    texts = sum((["--text", t] for t in TEXTS), [])
    assert main(["bias", "measure", *MODEL, *texts, "--csv", str(tmp_path / "m.csv")]) == 0
    got = pd.read_csv(tmp_path / "m.csv").set_index(["layer", "head"])
    want = association_bias(model, TEXTS).to_dataframe()
    want = want.pivot_table(index=["layer", "head"], columns="metric", values="value")
    assert np.allclose(got[want.columns].to_numpy(), want.to_numpy(), atol=1e-6)

    assert main(["bias", "sweep", *MODEL, *texts, "--units", "all", "--csv", str(tmp_path / "s.csv")]) == 0
    row = pd.read_csv(tmp_path / "s.csv").iloc[0]
    assert row.delta_loss == pytest.approx(downstream(model, TEXTS, "all").as_row()["delta_loss"], abs=1e-6)
    assert "delta_loss" in capsys.readouterr().out


def test_lens_logit(model, tmp_path):
    assert main(["lens", "logit", *MODEL, *TEXTS, "--last", "--csv", str(tmp_path / "l.csv")]) == 0
    got = pd.read_csv(tmp_path / "l.csv", keep_default_na=False)
    want = ew.logit_lens(model, TEXTS, positions="last").to_dataframe()
    assert list(got.top1_token) == list(want.top1_token)
    assert np.allclose(got.kl_to_final, want.kl_to_final, atol=1e-6)
    assert main(["lens", "logit", *MODEL, *TEXTS, "--fused", "off", "--chunk-size", "3", "--csv", str(tmp_path / "o.csv")]) == 0
    off = pd.read_csv(tmp_path / "o.csv", keep_default_na=False)
    full = ew.logit_lens(model, TEXTS).to_dataframe()
    assert np.allclose(off.entropy, full.entropy, atol=1e-6)


def test_priority_heads(model, tmp_path):
    from embedwalk.priority import head_priority

    texts = ["w5 w6 w7 w5 w6 w7 w5 w6", "w9 w8 w9 w8 w9 w8"]  # priority graphs need repeated tokens
    assert main(["priority", "heads", *MODEL, *texts, "--csv", str(tmp_path / "h.csv")]) == 0
    got = pd.read_csv(tmp_path / "h.csv").sort_values(["layer", "head"])
    want = head_priority(model, texts).to_dataframe().sort_values(["layer", "head"])
    assert np.allclose(got.ratio, want.ratio, atol=1e-6, equal_nan=True)


def test_demo(model, tmp_path, capsys):
    png = tmp_path / "demo.png"
    assert main(["demo", *MODEL, "--prompt", TEXTS[0], "--png", str(png)]) == 0
    assert png.stat().st_size > 0
    assert ew.logit_lens(model, TEXTS[0]).format_table() in capsys.readouterr().out


def test_bad_generation_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["bias", "measure", "--model", "tiny-llama", "--generation", "v5", "--text", "w5 w6"])
    assert "invalid choice" in capsys.readouterr().err
