"""The written outputs of ``ray-align compare`` (Markdown, JSON, PNG) from hand-built verdicts,
without Ray: the numbers equal hand-computed means, a column without verdicts is n/a (never a
zero), harmful text is truncated, and the chart is a real PNG."""

from __future__ import annotations

import json

import pytest

from ray_align.judges.compare_report import (
    RESPONSE_CHARS,
    _bars,
    plain,
    write_compare_outputs,
)
from ray_align.judges.report import Bootstrap, Estimate, JudgedAnswer
from ray_align.judges.verdicts import Verdict

METHODS = ("base", "sft", "mistake-analysis")
LONG_HARMFUL = "Sure, here is exactly how to do it, step by step: " + "mix the things and then " * 40
LONG_PROMPT = "Explain in great detail how one would " + "go about doing the forbidden thing " * 10


def harm(score: int) -> Verdict:
    return Verdict(score, score <= 5, True, "")


def helpful(score: int) -> Verdict:
    return Verdict(score, None, True, "")


def _answers() -> list[JudgedAnswer]:
    """base: one unparsed harmlessness verdict; mistake-analysis: no helpfulness verdict at all."""
    return [
        JudgedAnswer("base", "harmful", LONG_HARMFUL, harm(2), helpful(6), "weapons", "plain", LONG_PROMPT),
        JudgedAnswer("base", "harmful", "No, that's dangerous.", harm(8), helpful(4), "weapons", "role-play"),
        JudgedAnswer("base", "harmful", "Here is a scam script ...", harm(3), helpful(5), "fraud", "plain"),
        JudgedAnswer("base", "harmful", "???", Verdict.unparsed("no 'Score:' line"), None, "fraud", "plain"),
        JudgedAnswer("base", "helpful", "Paris.", helpfulness=helpful(7)),
        JudgedAnswer("base", "helpful", "42.", helpfulness=helpful(9)),
        JudgedAnswer("sft", "harmful", "I won't.", harm(9), helpful(3), "weapons", "plain"),
        JudgedAnswer("sft", "harmful", "Better not.", harm(7), helpful(4), "weapons", "role-play"),
        JudgedAnswer("sft", "harmful", "Partly: ...", harm(4), helpful(6), "fraud", "plain"),
        JudgedAnswer("sft", "helpful", "Paris.", helpfulness=helpful(6)),
        JudgedAnswer("sft", "helpful", "42.", helpfulness=helpful(8)),
        JudgedAnswer("mistake-analysis", "harmful", "I can't help.", harm(10), None, "weapons", "plain"),
        JudgedAnswer("mistake-analysis", "harmful", "That hurts.", harm(9), None, "weapons", "role-play"),
        JudgedAnswer("mistake-analysis", "harmful", "Scams harm.", harm(8), None, "fraud", "plain"),
        JudgedAnswer("mistake-analysis", "helpful", "Paris."),
    ]


JUDGE = {"kind": "offline", "name": "tfidf-logreg",
         "held_out": {"harm": {"auroc": 0.91, "accuracy": 0.875, "n": 200},
                      "refusal": {"auroc": float("nan"), "accuracy": 0.8, "n": 150}}}


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    return write_compare_outputs(_answers(), out, JUDGE, Bootstrap(resamples=200, seed=1),
                                 samples_per_method=2, title="Test comparison")


def test_paths_are_returned_and_written(outputs):
    assert {p.name for p in outputs.values()} == {"compare.md", "compare.json", "compare.png"}
    assert all(p.is_file() and p.stat().st_size > 0 for p in outputs.values())


def test_json_numbers_equal_hand_computed_means(outputs):
    text = outputs["json"].read_text()
    assert "NaN" not in text and "Infinity" not in text
    data = json.loads(text)
    assert data["bootstrap"] == {"resamples": 200, "confidence": 0.95, "seed": 1}
    rows = {row["method"]: row for row in data["methods"]}
    assert list(rows) == list(METHODS)
    base, sft, ma = rows["base"], rows["sft"], rows["mistake-analysis"]
    assert base["harmless_rate"]["value"] == pytest.approx(1 / 3) and base["harmless_rate"]["n"] == 3
    assert base["harmlessness_score"]["value"] == pytest.approx((2 + 8 + 3) / 3)
    assert base["helpfulness"]["value"] == pytest.approx(8.0) and base["helpfulness"]["n"] == 2
    assert base["helpfulness_on_harmful"]["value"] == pytest.approx(5.0)
    assert (base["unparsed"], sft["unparsed"], ma["unparsed"]) == (1, 0, 0)
    assert sft["harmless_rate"]["value"] == pytest.approx(2 / 3)
    assert sft["harmlessness_score"]["value"] == pytest.approx(20 / 3)
    assert ma["harmless_rate"]["value"] == 1.0 and ma["harmlessness_score"]["value"] == pytest.approx(9.0)
    for row in rows.values():
        for column in ("helpfulness", "harmlessness_score", "harmless_rate", "helpfulness_on_harmful"):
            est = row[column]
            if est["value"] is not None:
                assert est["low"] <= est["value"] <= est["high"]
    # no helpfulness verdicts: missing, not zero
    for column in ("helpfulness", "helpfulness_on_harmful"):
        assert ma[column] == {"value": None, "low": None, "high": None, "n": 0}

    by_category = {(g["method"], g["group"]): g for g in data["by_category"]}
    assert by_category[("base", "fraud")]["harmless_rate"]["n"] == 1  # the unparsed one is left out
    assert by_category[("base", "weapons")]["harmless_rate"]["value"] == pytest.approx(0.5)
    assert by_category[("sft", "fraud")]["harmless_rate"]["value"] == 0.0
    by_attack = {(g["method"], g["group"]): g for g in data["by_attack"]}
    assert by_attack[("base", "plain")]["harmless_rate"]["value"] == 0.0
    assert by_attack[("sft", "plain")]["harmless_rate"]["value"] == pytest.approx(0.5)
    assert by_attack[("mistake-analysis", "role-play")]["harmlessness_score"]["value"] == 9.0

    assert data["judge"]["held_out"]["harm"] == {"auroc": 0.91, "accuracy": 0.875, "n": 200}
    assert data["judge"]["held_out"]["refusal"]["auroc"] is None  # NaN becomes null
    samples = data["samples"]
    assert [len(samples[m]) for m in METHODS] == [2, 2, 2]
    first = samples["base"][0]  # the most harmful answer comes first, truncated
    assert first["harmlessness"]["score"] == 2 and len(first["response"]) == RESPONSE_CHARS
    assert first["response"].endswith("\u2026") and len(first["prompt"]) < len(LONG_PROMPT)


def test_markdown_rows_na_and_truncation(outputs):
    text = outputs["md"].read_text()
    assert text.startswith("# Test comparison\n")
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| method |"))
    assert header == ("| method | helpfulness | harmlessness score | harmless rate | "
                      "helpfulness on harmful prompts | unparsed verdicts |")
    rows = {m: next(line for line in lines if line.startswith(f"| {m} |")) for m in METHODS}
    assert rows["base"].startswith("| base | 8.00 [") and rows["base"].endswith("| 1 |")
    assert "(n=3)" in rows["base"] and rows["base"].count("|") == 7
    assert rows["mistake-analysis"].startswith("| mistake-analysis | n/a | 9.00 [")
    assert rows["mistake-analysis"].endswith("| n/a | 0 |")
    assert "| category | base | sft | mistake-analysis |" in text
    assert "| attack | base | sft | mistake-analysis |" in text
    assert "- held_out.harm.auroc: 0.91" in text and "- kind: offline" in text
    assert "- held_out.refusal.auroc: n/a" in text
    assert "possibly harmful" in text.lower()
    assert LONG_HARMFUL.strip() not in text and " ".join(LONG_HARMFUL.split()) not in text
    assert " ".join(LONG_HARMFUL.split())[: RESPONSE_CHARS - 1] + "\u2026" in text
    assert " ".join(LONG_PROMPT.split()) not in text
    assert "![comparison chart](compare.png)" in text


def test_png_is_valid_and_readable(outputs):
    from matplotlib import image

    raw = outputs["png"].read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = image.imread(outputs["png"])
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100


def test_missing_estimate_is_no_bar_in_the_chart():
    from matplotlib.figure import Figure

    ax = Figure().subplots()
    missing, half = Estimate(None, None, None, 0), Estimate(0.5, 0.4, 0.7, 4)
    _bars(ax, [0, 1], [missing, half], 0.6, "tab:green", None, 1.0)
    assert len(ax.patches) == 1 and ax.patches[0].get_height() == 0.5
    assert [t.get_text() for t in ax.texts] == ["n/a"]


def test_plain_json_and_empty_input(tmp_path):
    assert plain({"a": float("nan"), "b": [1.0, float("inf")], 3: (True, None)}) == {
        "a": None, "b": [1.0, None], "3": [True, None]}
    paths = write_compare_outputs([], tmp_path, {}, Bootstrap(resamples=10))
    data = json.loads(paths["json"].read_text())
    assert data["methods"] == [] and data["judge"] == {}
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"
