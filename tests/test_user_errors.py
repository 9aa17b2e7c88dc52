"""Mistakes a new user makes get an error that says what was wrong and what to do (issue 13 item 6)."""

import time

import pytest
import torch

import embedwalk as ew
from embedwalk.errors import EmbedwalkError, EmbedwalkWarning
from embedwalk.priority.model import head_priority
from embedwalk.store import cache_activations


@pytest.mark.parametrize("name,suggestion", [("smollm", "smollm2"), ("Tiny-Llama", "tiny-llama")])
def test_unknown_model_name_fails_fast_with_offline_choices(monkeypatch, name, suggestion):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(EmbedwalkError, match=rf"cannot load model '{name}'.*Did you mean '{suggestion}'.*need no network: 'smollm2'"):
        ew.load_model(name)
    assert time.perf_counter() - start < 5


def test_hub_name_without_network_fails_fast(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    # an unreachable endpoint stands for a machine without network: one short request, no retries
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "http://127.0.0.1:9")
    start = time.perf_counter()
    with pytest.raises(EmbedwalkError, match=r"cannot load model 'gpt2': the Hugging Face hub cannot be reached"):
        ew.load_model("gpt2")
    assert time.perf_counter() - start < 10
    with pytest.raises(EmbedwalkError, match="no folder or file exists"):
        ew.load_model("./no-such-model-folder")


def test_empty_prompt_is_refused_by_every_lens(tiny_arch):
    calls = {
        "logit_lens": lambda: ew.logit_lens(tiny_arch, ""),
        "logit_lens list": lambda: ew.logit_lens(tiny_arch, ["w5 w6", ""]),
        "walk_lens": lambda: ew.walk_lens(tiny_arch, ""),
        "decompose": lambda: ew.decompose(tiny_arch, "", token=5),
        "decoding_walk": lambda: ew.decoding_walk(tiny_arch, "", max_new_tokens=1),
    }
    for name, call in calls.items():
        with pytest.raises(EmbedwalkError, match="empty string: it would be read as the BOS token alone"):
            call()
    # whitespace passes the empty-string check but a word-level tokenizer drops it: BOS alone too
    for text in (" ", ["w5 w6", " \n "]):
        with pytest.raises(EmbedwalkError, match=r"tokenized to the BOS token alone"):
            ew.logit_lens(tiny_arch, text)
    # BOS alone stays possible on purpose, as token ids
    assert ew.logit_lens(tiny_arch, torch.tensor([[1]])).top_ids.shape[1] == 1


def test_unknown_words_and_targets_are_refused_on_a_word_level_model(tiny_arch):
    with pytest.raises(EmbedwalkError, match=r"'The capital of France' contains text this model's tokenizer does not know.*<unk>"):
        ew.logit_lens(tiny_arch, "The capital of France")
    with pytest.raises(EmbedwalkError, match=r"token ' Paris' contains text .* does not know"):
        ew.logit_lens(tiny_arch, "w5 w6", targets=" Paris")
    with pytest.raises(EmbedwalkError, match=r"token ' Paris' contains text .* does not know"):
        ew.decompose(tiny_arch, "w5 w6", token=" Paris")
    # words the model knows still work, and so does the unknown token written on purpose
    assert ew.logit_lens(tiny_arch, "w5 w6", targets="w7").target.tolist() == [7, 7, 7]
    ew.logit_lens(tiny_arch, "w5 <unk>")


def test_head_priority_with_nothing_to_score_says_why(tiny_arch):
    # graphs from one text, scored on text whose words never recur: no position can be scored
    with pytest.raises(EmbedwalkError, match=r"no query position of `inputs` could be scored, so every score would be NaN"):
        head_priority(tiny_arch, ["w40 w41 w42 w43"], graph_inputs=["w5 w6 w5 w6 w5 w6 w7 w5 w6"])


def test_store_refuses_a_folder_of_other_files(tiny_arch, tmp_path):
    (tmp_path / "thesis.tex").write_text("my own work")
    with pytest.raises(EmbedwalkError, match=r"is not empty \(1 entries, e.g. \['thesis.tex'\]\) and is not an embedwalk store"):
        cache_activations(tiny_arch, ["w5 w6"], tmp_path, layers=[0], positions="last", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thesis.tex"]


def test_tensors_on_the_meta_device_are_named(tiny_arch):
    # Issue 22 item 11: a meta tensor used to end in torch's "Tensor.item() cannot be called on
    # meta tensors" from deep inside tokenize.
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(EmbedwalkError, match=r"the token ids is on device 'meta' but the model is on 'cpu'.*no values"):
        ew.logit_lens(tiny_arch, ids.to("meta"))
    with pytest.raises(EmbedwalkError, match=r"attention_mask is on device 'meta' but the model is on 'cpu'"):
        ew.run(tiny_arch, ids, attention_mask=torch.ones(1, 3, device="meta"))
    with pytest.raises(EmbedwalkError, match=r"targets is on device 'meta'"):
        ew.logit_lens(tiny_arch, ids, targets=ids.to("meta"))
    with pytest.raises(EmbedwalkError, match=r"the token ids is on device 'meta'"):
        ew.decompose(tiny_arch, ids.to("meta"))
    ew.logit_lens(tiny_arch, ids, targets=ids)  # CPU tensors stay fine: batches move to the model


def test_a_target_word_without_its_leading_space_hints_at_the_spaced_token(smollm2):
    # Issue 22 item 11. On SmolLM2 "Berlin" is two tokens and " Berlin" one; "Paris" and
    # " Paris" are both tokens, and after "... France is" the model gives " Paris" ~500x the
    # probability of "Paris" (log-probs -0.29 and -6.45).
    a = ew.adapt(smollm2)
    spaced = int(a.to_tokens(" Berlin", prepend_bos=False)[0])
    with pytest.raises(EmbedwalkError, match=rf"'Berlin' is 2 tokens .*' Berlin'.* is one token \(id {spaced}\): pass that"):
        ew.decompose(smollm2, "The capital of Germany is", token="Berlin")
    with pytest.raises(EmbedwalkError, match=r"' Berlin'.* is one token"):
        ew.logit_lens(smollm2, "The capital of Germany is", targets="Berlin", readouts=[0], progress=False)
    with pytest.warns(EmbedwalkWarning, match=r"token='Paris' is token \d+, which the model finds [\d.]+x less likely than ' Paris'"):
        ew.decompose(smollm2, "The capital of France is", token="Paris", by_source=False)
    with pytest.warns(EmbedwalkWarning, match=r"pass targets=' Paris' if you meant the word"):
        ew.logit_lens(smollm2, "The capital of France is", targets="Paris", readouts=[0], progress=False)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", EmbedwalkWarning)
        ew.decompose(smollm2, "The capital of France is", token=" Paris", by_source=False)
        ew.logit_lens(smollm2, "The capital of France is", targets=" Paris", readouts=[0], progress=False)


def test_library_raises_no_bare_value_error():
    """Every user error is an EmbedwalkError (a ValueError subclass naming the fix): no library
    module raises a plain ValueError (read from the source, so a new one fails here)."""
    import ast
    from pathlib import Path

    import embedwalk

    bare = []
    for path in Path(embedwalk.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and node.exc is not None:
                call = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
                if isinstance(call, ast.Name) and call.id == "ValueError":
                    bare.append(f"{path.name}:{node.lineno}")
    assert not bare, bare
