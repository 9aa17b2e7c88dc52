"""Small curated concept datasets shipped with embedwalk.

The files live in ``embedwalk/data/concepts/`` (package data) and were written
for this project: plain CSV for word lists, JSON Lines for the multiple-choice
set.  Every loader returns a fresh object, so callers may edit it freely.

>>> from embedwalk.concepts import list_datasets, load_dataset
>>> list_datasets()[["name", "rows"]]
>>> caps = load_dataset("country_capitals")     # pandas DataFrame
>>> mc = load_dataset("multiple_choice")        # list of dicts
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

__all__ = [
    "DATA_DIR",
    "list_datasets",
    "load_dataset",
    "load_country_capitals",
    "load_plurals",
    "load_gender_pairs",
    "load_number_words",
    "load_colours",
    "load_verb_tenses",
    "load_multiple_choice",
]

# Relative to this file rather than importlib.resources: works for installed
# wheels, editable installs and a bare checkout alike.
DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "concepts"

_DATASETS = {
    "country_capitals": ("country_capitals.csv",
                         "Countries with their capital city and continent."),
    "plurals": ("plurals.csv", "English nouns, singular and plural, with an irregular flag."),
    "gender_pairs": ("gender_pairs.csv",
                     "Male/female word pairs (family, titles, roles, animals, pronouns)."),
    "number_words": ("number_words.csv",
                     "Number words one..twenty and thirty..ninety (plus zero, hundred) with values."),
    "colours": ("colours.csv",
                "Colour names with an approximate hex value and a warm/cool/neutral temperature."),
    "verb_tenses": ("verb_tenses.csv",
                    "Verbs: base, simple past, past participle, with a regular flag."),
    "multiple_choice": ("multiple_choice.jsonl",
                        "Four-option multiple-choice items: context segments, question, gold index."),
}


def _path(name: str) -> Path:
    if name not in _DATASETS:
        raise KeyError(f"unknown dataset {name!r}; choose from {sorted(_DATASETS)}")
    return DATA_DIR / _DATASETS[name][0]


def _csv(name: str) -> pd.DataFrame:
    # keep_default_na=False: words like "None" or "NA" must stay words.
    return pd.read_csv(_path(name), keep_default_na=False)


def load_country_capitals() -> pd.DataFrame:
    """Columns: ``country, capital, continent``."""
    return _csv("country_capitals")


def load_plurals() -> pd.DataFrame:
    """Columns: ``singular, plural, irregular`` (bool)."""
    df = _csv("plurals")
    df["irregular"] = df["irregular"].astype(bool)
    return df


def load_gender_pairs() -> pd.DataFrame:
    """Columns: ``male, female, domain``."""
    return _csv("gender_pairs")


def load_number_words() -> pd.DataFrame:
    """Columns: ``word, value`` (int), ``kind`` (unit / teen / tens / other)."""
    df = _csv("number_words")
    df["value"] = df["value"].astype(int)
    return df


def load_colours() -> pd.DataFrame:
    """Columns: ``colour, hex, temperature`` (warm / cool / neutral)."""
    return _csv("colours")


def load_verb_tenses() -> pd.DataFrame:
    """Columns: ``base, past, past_participle, regular`` (bool)."""
    df = _csv("verb_tenses")
    df["regular"] = df["regular"].astype(bool)
    return df


def load_multiple_choice() -> list[dict]:
    """Items ``{"id", "category", "context": [str, ...], "question", "options": [4 str], "answer": int}``."""
    with open(_path("multiple_choice"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


_LOADERS = {
    "country_capitals": load_country_capitals,
    "plurals": load_plurals,
    "gender_pairs": load_gender_pairs,
    "number_words": load_number_words,
    "colours": load_colours,
    "verb_tenses": load_verb_tenses,
    "multiple_choice": load_multiple_choice,
}


def load_dataset(name: str) -> pd.DataFrame | list[dict]:
    """Load a dataset by name (see :func:`list_datasets`)."""
    _path(name)
    return _LOADERS[name]()


def list_datasets() -> pd.DataFrame:
    """Name, file, number of rows/items and a one-line description of each dataset."""
    rows = []
    for name, (file, desc) in _DATASETS.items():
        rows.append({"name": name, "file": file, "rows": len(load_dataset(name)),
                     "description": desc})
    return pd.DataFrame(rows)
