"""Every ```python block of README.md runs as written (the convention is stated at the top of
the README): blocks of one section share a namespace, in order; a block marked ``readme: slow``
runs only with EMBEDWALK_README_SLOW=1. ``ew.load_model`` returns one model per set of
arguments for the whole session (the same real model, loaded once), so that sections that each
load SmolLM2 cost one load."""

import os
import re
from pathlib import Path

import pytest

README = Path(__file__).parent.parent / "README.md"
SLOW = os.environ.get("EMBEDWALK_README_SLOW") == "1"


def sections(text: str):
    """[(heading, [(line, code, slow), ...])] for every section with python blocks."""
    out, heading, blocks, marker = [], "preamble", [], False
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if re.match(r"#{2,3} ", line):
            out.append((heading, blocks))
            heading, blocks, marker = line.lstrip("#").strip(), [], False
        elif line.strip() == "<!-- readme: slow -->":
            marker = True
        elif line.startswith("```"):
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            if line.strip() == "```python":
                blocks.append((i + 2, "\n".join(lines[i + 1:end]), marker))
            marker, i = False, end
        elif line.strip():
            marker = False
        i += 1
    out.append((heading, blocks))
    return [(h, b) for h, b in out if b]


SECTIONS = sections(README.read_text(encoding="utf-8"))


def test_readme_has_blocks():
    # The parser found the blocks (a fence typo would silently skip a section).
    assert sum(len(b) for _, b in SECTIONS) == README.read_text(encoding="utf-8").count("```python")


@pytest.fixture(scope="module")
def cached_load_model(smollm2):
    import embedwalk as ew
    import embedwalk.models as models
    from embedwalk.testing import installed_generation

    original, cache = models.load_model, {}

    def load_model(source="smollm2", *, generation=None, device=None, **kw):
        key = (str(source), generation or installed_generation(), device or models.default_device(), repr(kw))
        if key not in cache:
            if key[:3] == ("smollm2", installed_generation(), "cpu") and not kw:
                cache[key] = smollm2  # the session's SmolLM2
            else:
                cache[key] = original(source, generation=generation, device=device, **kw)
        return cache[key]

    mp = pytest.MonkeyPatch()
    mp.setattr(models, "load_model", load_model)
    mp.setattr(ew, "load_model", load_model)
    yield
    mp.undo()


@pytest.mark.parametrize("blocks", [b for _, b in SECTIONS], ids=[h.split("(")[0].strip() for h, _ in SECTIONS])
def test_readme_section_runs(blocks, cached_load_model, tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    if not SLOW and all(slow for *_, slow in blocks):
        pytest.skip("only slow blocks (EMBEDWALK_README_SLOW=1 runs them)")
    monkeypatch.chdir(tmp_path)  # blocks write files (lens/, acts/, prompts.jsonl) where they run
    namespace = {"__name__": "__readme__"}
    for line, code, slow in blocks:
        if slow and not SLOW:
            continue
        exec(compile(code, f"{README}:{line}", "exec"), namespace)
        plt.close("all")
