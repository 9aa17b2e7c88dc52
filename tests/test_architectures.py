"""Every tiny family x mode (TL 4 bridge raw / compatibility mode, or TL 3) x capability is
exact against the Hugging Face model itself, or refused with an ArchitectureError naming the
architecture; see tests/architectures.py for the cells and their independent references."""

import pytest
import torch

from architectures import CAPABILITIES, CASES, case, check_nonvacuous, run_cell
from embedwalk import adapt
from embedwalk.errors import ArchitectureError
from embedwalk.testing import installed_generation, matrix_case

GEN = installed_generation()


@pytest.fixture(scope="session")
def store_tmp(tmp_path_factory):
    return str(tmp_path_factory.mktemp("arch-store"))


@pytest.mark.parametrize("family,mode", CASES, ids=[f"{f}-{m}" for f, m in CASES])
def test_not_vacuous(family, mode):
    check_nonvacuous(case(family, mode))


@pytest.mark.parametrize("capability", list(CAPABILITIES))
@pytest.mark.parametrize("family,mode", CASES, ids=[f"{f}-{m}" for f, m in CASES])
def test_cell(family, mode, capability, store_tmp):
    run_cell(family, mode, capability, store_tmp)


def _first(family):
    return case(family, CASES[[f for f, _ in CASES].index(family)][1])


def test_readout_applies_the_output_transform():
    """Gemma-2's soft-cap (5) changes the logits: without it the readout would be off."""
    c = _first("gemma2")
    a = adapt(c.model)
    x = torch.randn(3, a.d_model) * 30
    assert float((a.readout(x) - a.readout(x, transform=False)).abs().max()) > 1.0
    assert a.output_scale is None  # a soft-cap is not linear


def test_self_check_refuses_a_readout_that_misses_the_transform(monkeypatch):
    from embedwalk.adapter import ModelAdapter

    c = _first("gemma2")
    monkeypatch.setattr(ModelAdapter, "output_transform", lambda self, logits: logits)
    with pytest.raises(ArchitectureError, match=r"self-check failed.*Gemma2.*soft-capped or rescaled"):
        ModelAdapter(c.model)


@pytest.mark.skipif(GEN != "bridge", reason="Granite and OPT's flattened hooks are TL 4 bridge facts")
def test_derived_and_flattened_hooks_are_named():
    granite = adapt(_first("granite").model)
    assert granite.source("blocks.0.hook_attn_out").how == "derived: resid_mid - resid_pre"
    assert granite.blocks[0].residual_scale == pytest.approx(0.5)
    opt = adapt(_first("opt").model)
    assert opt.source("blocks.0.hook_resid_mid").flat
    xglm = adapt(_first("xglm").model)
    assert xglm.has_pos_embed and not xglm.source("hook_pos_embed").direct


def test_writer_on_a_derived_hook_is_refused():
    from embedwalk.run import Writer, run

    class Noop(Writer):
        def hook_points(self, adapter):
            return ["blocks.0.hook_attn_out"]

        def write(self, name, value, ctx):
            return value

    fam = "granite" if GEN == "bridge" else None
    if fam is None:
        pytest.skip("no tiny TL 3 model with a derived attn_out")
    with pytest.raises(ArchitectureError, match="does not fire as itself"):
        run(_first(fam).model, torch.tensor([[1, 5, 6]]), writers=[Noop()])


def test_parallel_mid_refusal_says_why():
    c = _first("neox")
    with pytest.raises(ArchitectureError, match="parallel"):
        adapt(c.model).readout_points(mid=True)


def test_adapter_reprobes_when_the_mode_changes():
    if GEN != "bridge":
        pytest.skip("compatibility mode is a TL 4 bridge mode")
    from embedwalk.testing import tiny_model

    model = tiny_model("gpt2", GEN)
    raw = adapt(model)
    assert adapt(model) is raw and not raw.compat
    model.enable_compatibility_mode()
    compat = adapt(model)
    assert compat is not raw and compat.compat and compat.readout_gap <= 2e-5
