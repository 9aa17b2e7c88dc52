"""Print (or write into README.md) the "Supported architectures" table from the test matrix.

Runs every cell of ``tests/architectures.py`` for the installed TransformerLens generation
(each exact against the Hugging Face model, or refused with an ArchitectureError) and prints
a Markdown table: one row per family, one column per mode, "exact" or the refused
capabilities and why. Run it once per generation (TL 4 gives the bridge columns, TL 3 the
HookedTransformer column) and merge with ``--readme``, which replaces the rows of the
installed generation's columns between the table markers in README.md.

    PYTHONPATH=. python scripts/architectures_table.py            # print
    PYTHONPATH=. python scripts/architectures_table.py --readme   # update README.md
    # or run each generation with --json FILE, then merge: --readme --from-json a.json b.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

BEGIN, END = "<!-- architectures-table:begin -->", "<!-- architectures-table:end -->"
COLUMNS = {"bridge": "TL 4.3 bridge", "compat": "TL 4.3 compatibility mode", "hooked": "TL 3.9 HookedTransformer"}
NAMES = {
    "gpt2": "GPT-2", "neox": "GPT-NeoX (Pythia)", "gptj": "GPT-J", "phi": "Phi-1/2", "phi3": "Phi-3",
    "falcon": "Falcon", "opt": "OPT", "gpt_neo": "GPT-Neo", "bloom": "BLOOM", "llama": "Llama",
    "mistral": "Mistral", "mixtral": "Mixtral", "qwen2": "Qwen2", "qwen3": "Qwen3", "gemma": "Gemma",
    "gemma2": "Gemma-2", "gemma3": "Gemma-3", "olmo": "OLMo", "olmo2": "OLMo-2", "granite": "Granite",
    "xglm": "XGLM", "stablelm": "StableLM", "starcoder2": "StarCoder2", "cohere": "Cohere",
}


def cells() -> dict:
    """``{family: {mode: text}}`` for the installed generation."""
    from architectures import CAPABILITIES, CASES, case, run_cell

    import torch

    torch.set_num_threads(1)
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for family, mode in CASES:
            refused = {}
            for cap in CAPABILITIES:
                status, info = run_cell(family, mode, cap, tmp)
                if status == "refused":
                    refused[cap] = CAPABILITIES[cap][1](case(family, mode))
            reasons = sorted(set(refused.values()))
            if not refused:
                text = "exact"
            elif reasons == ["parallel block: no resid_mid"]:
                text = "exact; parallel blocks: mid readouts refused"
            else:
                text = "exact; refused: " + ", ".join(refused) + f" ({'; '.join(reasons)})"
            out.setdefault(family, {})[mode] = text
    return out


def table(data: dict) -> str:
    from embedwalk.testing import FAMILIES, HOOKED_MISSING

    head = "| family | " + " | ".join(COLUMNS.values()) + " |"
    rows = [head, "|" + "---|" * (len(COLUMNS) + 1)]
    for f in FAMILIES:
        row = [NAMES.get(f, f)]
        for mode in COLUMNS:
            text = data.get(f, {}).get(mode)
            if text is None and mode == "hooked" and f in HOOKED_MISSING:
                text = f"not available: {HOOKED_MISSING[f]}"
            row.append(text or "?")
        rows.append("| " + " | ".join(row) + " |")
    return "\n".join(rows)


def _read_existing(readme: str) -> dict:
    """The cells already in README.md's table, to merge one generation's run into."""
    if BEGIN not in readme:
        return {}
    body = readme.split(BEGIN, 1)[1].split(END, 1)[0]
    data: dict = {}
    inverse = {v: k for k, v in NAMES.items()}
    for line in body.strip().splitlines()[2:]:
        parts = [p.strip() for p in line.strip().strip("|").split("|")]
        if len(parts) == len(COLUMNS) + 1 and parts[0] in inverse:
            data[inverse[parts[0]]] = {m: t for m, t in zip(COLUMNS, parts[1:]) if t != "?" and not t.startswith("not available")}
    return data


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--readme", action="store_true", help="write the table into README.md")
    ap.add_argument("--json", help="also write the cells as JSON to this file")
    ap.add_argument("--from-json", nargs="+", help="merge cells saved by --json runs instead of running the matrix")
    args = ap.parse_args(argv)
    if args.from_json:
        new: dict = {}
        for f in args.from_json:
            for fam, modes in json.loads(Path(f).read_text()).items():
                new.setdefault(fam, {}).update(modes)
    else:
        new = cells()
    if args.json:
        Path(args.json).write_text(json.dumps(new, indent=1))
    path = ROOT / "README.md"
    text = path.read_text()
    data = _read_existing(text)
    for f, modes in new.items():
        data.setdefault(f, {}).update(modes)
    out = table(data)
    if args.readme:
        if BEGIN not in text:
            raise SystemExit(f"README.md has no {BEGIN} marker")
        before, rest = text.split(BEGIN, 1)
        after = rest.split(END, 1)[1]
        path.write_text(f"{before}{BEGIN}\n{out}\n{END}{after}")
    print(out)


if __name__ == "__main__":
    main()
