"""Curated concept datasets: files load, sizes as promised, contents consistent."""

from collections import Counter

import pytest

from embedwalk.concepts.datasets import (
    DATA_DIR,
    list_datasets,
    load_colours,
    load_country_capitals,
    load_dataset,
    load_gender_pairs,
    load_multiple_choice,
    load_number_words,
    load_plurals,
    load_verb_tenses,
)


def test_list_datasets_names_every_shipped_file():
    table = list_datasets()
    assert set(table["name"]) == {"country_capitals", "plurals", "gender_pairs", "number_words",
                                  "colours", "verb_tenses", "multiple_choice"}
    assert sorted(table["file"]) == sorted(p.name for p in DATA_DIR.iterdir() if p.is_file())
    assert (table["rows"] > 0).all()
    with pytest.raises(KeyError):
        load_dataset("nope")


@pytest.mark.parametrize(
    "loader, key, minimum",
    [
        (load_country_capitals, ["country", "capital"], 40),
        (load_plurals, ["singular", "plural"], 60),
        (load_gender_pairs, ["male", "female"], 30),
        (load_colours, ["colour"], 20),
        (load_verb_tenses, ["base"], 50),
    ],
)
def test_word_lists_have_promised_sizes_and_no_duplicates(loader, key, minimum):
    df = loader()
    assert len(df) >= minimum
    for col in key:
        assert df[col].is_unique, col
    assert not (df.astype(str) == "").any().any()


def test_country_capitals_contents():
    df = load_country_capitals()
    caps = dict(zip(df["country"], df["capital"]))
    assert caps["France"] == "Paris" and caps["United States"] == "Washington, D.C."
    assert set(df["continent"]) == {"Europe", "Africa", "Asia", "North America", "South America",
                                    "Oceania"}


def test_plural_and_verb_flags():
    pl = load_plurals()
    assert pl["irregular"].dtype == bool and pl["irregular"].sum() >= 15
    regular = pl[~pl["irregular"]]
    assert all(p.endswith("s") for p in regular["plural"])  # -s, -es, -ies
    vt = load_verb_tenses()
    assert vt["regular"].sum() >= 20 and (~vt["regular"]).sum() >= 30
    reg = vt[vt["regular"]]
    assert all(p.endswith("ed") and p == pp for p, pp in zip(reg["past"], reg["past_participle"]))


def test_number_words_values():
    df = load_number_words()
    values = dict(zip(df["word"], df["value"]))
    for i, w in enumerate("one two three four five six seven eight nine ten eleven twelve thirteen "
                          "fourteen fifteen sixteen seventeen eighteen nineteen twenty".split(), 1):
        assert values[w] == i
    for w, v in [("thirty", 30), ("forty", 40), ("fifty", 50), ("sixty", 60), ("seventy", 70),
                 ("eighty", 80), ("ninety", 90)]:
        assert values[w] == v


def test_colours_have_temperature_and_hex():
    df = load_colours()
    counts = Counter(df["temperature"])
    assert counts["warm"] >= 8 and counts["cool"] >= 8 and set(counts) <= {"warm", "cool", "neutral"}
    assert df["hex"].str.fullmatch(r"#[0-9A-F]{6}").all()


def test_gender_pairs_are_distinct_words():
    df = load_gender_pairs()
    assert (df["male"] != df["female"]).all()
    assert {"king", "father", "he"} <= set(df["male"])


def test_multiple_choice_items_are_well_formed_and_balanced():
    items = load_multiple_choice()
    assert len(items) >= 200
    assert len({it["id"] for it in items}) == len(items)
    for it in items:
        assert 2 <= len(it["context"]) <= 4 and all(s.strip() for s in it["context"])
        assert it["question"].endswith("?")
        assert len(it["options"]) == 4 and len(set(it["options"])) == 4
        assert it["answer"] in range(4)
    gold = Counter(it["answer"] for it in items)
    assert max(gold.values()) - min(gold.values()) <= 1 and len(gold) == 4
    # Answers are not guessable from position within a category either.
    for cat in {it["category"] for it in items}:
        per = Counter(it["answer"] for it in items if it["category"] == cat)
        assert max(per.values()) <= 0.5 * sum(per.values()), cat
