"""The learning curve's report (``compare.steps``): rates per point with intervals, paired
differences from the untrained model asked the same way, and the three files agreeing."""

from __future__ import annotations

import json

import pytest

from ray_align.judges.curve_report import CurvePoint, write_curve_outputs
from ray_align.judges.report import Bootstrap, JudgedAnswer
from ray_align.judges.verdicts import Verdict

HARMFUL = 10  # harmful prompts per row
SAFE = 4  # over-refusal prompts per row
# harmless answers out of HARMFUL, and safe prompts declined out of SAFE, per row
ROWS = {"vanilla": (2, 0), "vanilla+reminder": (5, 1),
        "sft@2": (4, 0), "sft": (8, 1), "sft@2+reminder": (6, 2), "sft+reminder": (9, 3)}


def _answers() -> list[JudgedAnswer]:
    out = []
    for row, (harmless, refused) in ROWS.items():
        for i in range(HARMFUL):
            safe = i < harmless
            out.append(JudgedAnswer(row, "harmful", "no" if safe else "sure",
                                    Verdict(9 if safe else 2, not safe, True, ""), prompt=f"h{i}"))
        out += [JudgedAnswer(row, "over_refusal", "x", prompt=f"s{i}", refused=i < refused)
                for i in range(SAFE)]
    # an unparsed verdict is left out of the rate, never counted as harmless
    out.append(JudgedAnswer("sft", "harmful", "?", Verdict.unparsed("garbled"), prompt="h-extra"))
    return out


POINTS = [CurvePoint("vanilla", "sft", 0), CurvePoint("sft@2", "sft", 2, 4, 8),
          CurvePoint("sft", "sft", 4, 8, 8),
          CurvePoint("vanilla+reminder", "sft+reminder", 0),
          CurvePoint("sft@2+reminder", "sft+reminder", 2, 4, 8),
          CurvePoint("sft+reminder", "sft+reminder", 4, 8, 8)]


@pytest.fixture(scope="module")
def curve(tmp_path_factory):
    out = tmp_path_factory.mktemp("curve")
    paths = write_curve_outputs(POINTS, _answers(), out, Bootstrap(resamples=200), {"kind": "offline"},
                                {"induction prompts": "asset:advbench rows 0-9"})
    return paths, json.loads(paths["json"].read_text())


def test_every_point_has_its_rates_and_what_it_trained_on(curve):
    _, data = curve
    assert data["steps"] == [0, 2, 4]
    lines = {line["line"]: line for line in data["lines"]}
    assert set(lines) == {"sft", "sft+reminder"}
    assert lines["sft+reminder"]["baseline"] == "vanilla+reminder"
    for line in lines.values():
        assert [p["step"] for p in line["points"]] == [0, 2, 4]
        for p in line["points"]:
            harmless, refused = ROWS[p["row"]]
            assert p["harmless_rate"]["value"] == pytest.approx(harmless / HARMFUL)
            assert p["harmless_rate"]["n"] == HARMFUL  # the unparsed verdict is not counted
            assert p["over_refusal_rate"]["value"] == pytest.approx(refused / SAFE)
            low, high = p["harmless_rate"]["low"], p["harmless_rate"]["high"]
            assert low <= p["harmless_rate"]["value"] <= high
    last = lines["sft"]["points"][-1]
    assert (last["samples_seen"], last["epochs_seen"]) == (8, 1.0)


def test_paired_differences_are_against_the_untrained_model_asked_the_same_way(curve):
    _, data = curve
    lines = {line["line"]: line for line in data["lines"]}
    plain = {p["step"]: p["difference"] for p in lines["sft"]["points"]}
    assert plain[0] == {}  # the untrained model itself
    assert plain[4]["harmless_rate"]["baseline"] == "vanilla"
    assert plain[4]["harmless_rate"]["value"] == pytest.approx((8 - 2) / HARMFUL)
    reminded = {p["step"]: p["difference"] for p in lines["sft+reminder"]["points"]}
    assert reminded[2]["harmless_rate"]["value"] == pytest.approx((6 - 5) / HARMFUL)
    assert reminded[4]["over_refusal_rate"]["value"] == pytest.approx((3 - 1) / SAFE)
    assert reminded[4]["over_refusal_rate"]["baseline"] == "vanilla+reminder"


def test_the_markdown_tables_every_budget_and_the_png_is_written(curve):
    paths, _ = curve
    text = paths["md"].read_text()
    assert "![learning curve](curve.png)" in text
    assert "| line | 0 | 2 | 4 |" in text and "| line | 2 | 4 |" in text
    assert "+60.0 [" in text  # sft at 4 steps minus vanilla: 0.8 - 0.2 = +60 points
    assert "asset:advbench rows 0-9" in text and "| sft | 4 | 8 | 1.00 |" in text
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
