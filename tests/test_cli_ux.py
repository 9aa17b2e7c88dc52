"""The command line as a new user meets it: fast --help that imports no torch, a help text on
every option, ``embedwalk: error: ...`` (exit 2) instead of tracebacks, and ``lens logit --last``
rows with a real target."""

import argparse
import subprocess
import sys

import pandas as pd
import pytest
import torch

import embedwalk as ew
from embedwalk.cli import build_parser, main
from tolerance import logprob_tol
from embedwalk.testing import installed_generation

MODEL = ["--model", "tiny-llama", "--generation", installed_generation(), "--device", "cpu"]
HEAVY = ("torch", "pandas", "numpy", "transformer_lens", "transformers", "matplotlib", "scipy")


LEAVES = """
import argparse


def _leaves(parser, path=()):
    \"\"\"(command path, parser) for the main parser and every subcommand parser.\"\"\"
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _leaves(sub, path + (name,))
"""
exec(LEAVES)


def test_help_imports_no_torch():
    # Every --help of every subcommand in one fresh interpreter, then look at what got imported.
    code = LEAVES + f"""
import sys
from embedwalk.cli import build_parser, main
paths = [list(p) for p, _ in _leaves(build_parser())]
for p in paths:
    try:
        main(p + ["--help"])
    except SystemExit as e:
        assert e.code == 0, (p, e.code)
print(len(paths), sorted(m for m in {HEAVY!r} if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    n, loaded = out.strip().splitlines()[-1].split(" ", 1)
    assert int(n) > 15 and loaded == "[]", out[-2000:]


def test_every_option_has_help():
    missing = [
        f"embedwalk {' '.join(path)} {a.option_strings or a.dest}"
        for path, parser in _leaves(build_parser())
        for a in parser._actions
        if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)) and not a.help
    ]
    assert not missing


def test_lens_logit_last_has_a_real_target(tmp_path):
    model = ew.load_model("tiny-llama", device="cpu")
    texts = ["w5 w6 w7 w8 w9", "w10 w11 w12"]
    assert main(["lens", "logit", *MODEL, *texts, "--last", "--csv", str(tmp_path / "l.csv")]) == 0
    df = pd.read_csv(tmp_path / "l.csv", keep_default_na=False)
    final = df[df.layer == df.layer.iloc[-1]].sort_values("prompt")
    for i, text in enumerate(texts):
        # The model's own logits at the last token, without embedwalk's readout.
        a = ew.adapt(model)
        with torch.no_grad():
            logits, cache = model.run_with_cache(model.to_tokens(text), names_filter=[a.final_resid_hook])
        logits = logits[0, -1].double()
        tol = logprob_tol(a, cache[a.final_resid_hook][0, -1], logits.log_softmax(-1))
        want = int(logits.argmax())
        rows = df[df.prompt == i]
        assert (rows.target == model.to_string(torch.tensor([want]))).all()
        assert (rows.target_rank >= 0).all() and rows.target_logprob.notna().all()
        row = final[final.prompt == i].iloc[0]
        assert row.target_rank == 0
        assert row.target_logprob == pytest.approx(float(logits.log_softmax(-1)[want]), abs=tol)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_cpu_machine_is_a_clear_error(capsys):
    with pytest.raises(ew.EmbedwalkError, match="device='cuda'.*device='cpu'"):
        ew.load_model("tiny-gpt2", device="cuda")
    assert main(["lens", "logit", "--model", "tiny-gpt2", "--device", "cuda", "w5 w6"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("embedwalk: error: device='cuda'") and "Traceback" not in err
    assert main(["bias", "retrain", "--device", "cuda"]) == 2  # its own --device, checked before training
    assert "CPU-only build" in capsys.readouterr().err or torch.version.cuda


def test_user_errors_print_one_line(tmp_path, capsys):
    assert main(["lens", "logit", *MODEL, "--device", "gpu", "w5 w6"]) == 2
    assert "is not a torch device" in capsys.readouterr().err
    missing = tmp_path / "missing.txt"
    assert main(["priority", "heads", *MODEL, "--text-file", str(missing)]) == 2
    assert capsys.readouterr().err == f"embedwalk: error: No such file or directory: {missing}\n"


def test_unwritable_outputs_are_refused_before_any_work(tmp_path, capsys, monkeypatch):
    import embedwalk.cli_args as cli_args

    def no_model(args):  # the check comes first: no model is loaded for a run whose output would be lost
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(cli_args, "model_from_args", no_model)
    monkeypatch.setattr("embedwalk.lenses.cli.model_from_args", no_model)
    missing = tmp_path / "nowhere" / "x.csv"
    assert main(["lens", "logit", *MODEL, "w5 w6", "--csv", str(missing)]) == 2
    assert capsys.readouterr().err.startswith(f"embedwalk: error: cannot write {missing} (--csv): the folder")
    assert main(["lens", "logit", *MODEL, "w5 w6", "--plot", str(tmp_path)]) == 2
    assert f"cannot write {tmp_path} (--plot): it is a folder" in capsys.readouterr().err
    assert main(["bias", "sweep", *MODEL, "--csv", str(missing)]) == 2
    assert "embedwalk: error: cannot write" in capsys.readouterr().err
    # the renamed --layers is refused before the model loads, in command-line syntax
    assert main(["lens", "tuned-train", *MODEL, "--layers", "1,2", "--out", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err
    assert "--readouts embed,0" in err and "--readouts 2,3" in err


def test_lens_logit_readouts(tmp_path):
    csv = tmp_path / "r.csv"
    assert main(["lens", "logit", *MODEL, "w5 w6 w7", "--readouts", "embed,2", "--csv", str(csv)]) == 0
    got = pd.read_csv(csv)
    whole = ew.logit_lens(ew.load_model("tiny-llama", device="cpu"), "w5 w6 w7").to_dataframe()
    assert sorted(got.layer.astype(str).unique()) == ["1", "embed"]  # readout 2 = output of block 1
    want = whole[whole.layer.astype(str).isin(["embed", "1"])]
    assert len(got) == len(want) and abs(got.kl_to_final.to_numpy() - want.kl_to_final.to_numpy()).max() < 1e-5
