"""What the bundled model is, said where researchers look, and true (issue 22 item 9): figures
made with ``load_model("smollm2")`` end up in papers."""

import inspect
from pathlib import Path

import torch

import embedwalk as ew
from embedwalk.testing import installed_generation
from embedwalk.models import SMOLLM2_ABOUT, SMOLLM2_FILE, smollm2_gguf_path

GENERATION = installed_generation()
README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
FACTS = ["SmolLM2-135M-Instruct.Q4_1.gguf", "float32", "<|im_start|>"]


def test_load_model_and_the_readme_say_what_the_bundled_model_is():
    doc = inspect.getdoc(ew.load_model)
    for fact in FACTS + ["Q4_1", "de-quantised"]:
        assert fact in doc, fact
        assert fact in SMOLLM2_ABOUT, fact
    for fact in FACTS:
        assert fact in README, fact
    for param in inspect.signature(ew.load_model).parameters:
        assert f"{param}:" in doc, param


def test_what_is_said_about_the_bundled_model_is_true(smollm2):
    assert smollm2_gguf_path().name == SMOLLM2_FILE == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert {p.dtype for p in smollm2.parameters()} == {torch.float32}
    a = ew.adapt(smollm2)
    assert a.tokenizer.bos_token == "<|im_start|>" and a.tokenizer.bos_token_id == 1
    lens = ew.logit_lens(smollm2, ["The capital of France is", "One, two"], readouts=[0], progress=False)
    first = lens.token[lens.pos == 0]
    assert first.tolist() == [1, 1]  # every prompt starts with <|im_start|>
    # the bridge keeps the file's name; hooked_from_hf builds a "custom" HookedTransformer
    assert smollm2.cfg.model_name == ("SmolLM2-135M-Instruct.Q4_1" if GENERATION == "bridge" else "custom")
