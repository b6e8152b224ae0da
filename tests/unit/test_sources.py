import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ray_align.config import SourceConfig
from ray_align.sources import DataError, load_source


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _load(path, on_bad_row="error", max_chars=100, **kw):
    return load_source(SourceConfig(path=path, **kw), max_chars, on_bad_row)


def test_jsonl_csv_parquet_give_the_same_rows(tmp_path):
    rows = [{"q": "How do tides work?", "k": "a"}, {"q": "Why is the sky blue?", "k": "b"}]
    paths = [_jsonl(tmp_path / "p.jsonl", rows)]
    (tmp_path / "p.csv").write_text("q,k\n" + "".join(f"{r['q']},{r['k']}\n" for r in rows))
    paths.append(str(tmp_path / "p.csv"))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    paths.append(str(tmp_path / "p.parquet"))
    loaded = [_load(p, prompt_column="q", id_column="k").table for p in paths]
    for table in loaded:
        assert table.column("id").to_pylist() == ["a", "b"]
        assert table.column("prompt").to_pylist() == [r["q"] for r in rows]


def test_ids_are_stable_hashes_without_an_id_column(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "one"}, {"prompt": "two"}])
    assert _load(path).table.column("id").to_pylist() == _load(path).table.column("id").to_pylist()


def test_offset_and_limit(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": f"p{i}"} for i in range(10)])
    assert _load(path, offset=3, limit=2).table.column("prompt").to_pylist() == ["p3", "p4"]


@pytest.mark.parametrize(
    ("rows", "reason"),
    [
        ([{"prompt": "fine"}, {"prompt": ""}], "row 2: prompt: empty"),
        ([{"prompt": "fine"}, {"prompt": 42}], "row 2: prompt: not a string"),
        ([{"prompt": "fine"}, {"prompt": None}], "row 2: prompt: missing"),
        ([{"prompt": "fine"}, {"prompt": "x" * 101}], "row 2: prompt: 101 characters"),
        ([{"prompt": "same"}, {"prompt": "same"}], "row 2: duplicate prompt"),
    ],
)
def test_bad_rows_stop_or_are_quarantined(tmp_path, rows, reason):
    path = _jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(DataError, match=reason):
        _load(path)
    loaded = _load(path, on_bad_row="quarantine")
    assert loaded.table.num_rows == 1
    assert [q["row"] for q in loaded.quarantined] == [2]
    assert reason.split(": ", 1)[1] in loaded.quarantined[0]["reason"]


def test_duplicate_ids_are_named(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", [{"id": 1, "prompt": "a"}, {"id": 1, "prompt": "b"}])
    with pytest.raises(DataError, match="row 2: duplicate id '1'"):
        _load(path, id_column="id")


def test_file_level_errors_name_the_file(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", [{"text": "a"}])
    with pytest.raises(DataError, match=r"p.jsonl: missing column 'prompt' \(found: text\)"):
        _load(path)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        _load(str(empty))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(DataError, match="broken.jsonl row 2: not valid JSON"):
        _load(str(broken))
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"prompt": "a"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(DataError, match="latin.jsonl row 2: invalid UTF-8"):
        _load(str(latin))
    with pytest.raises(DataError, match="cannot read"):
        _load(str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match="unknown format"):
        _load(str(tmp_path / "prompts.txt"))


def test_all_rows_bad_is_an_error_even_in_quarantine_mode(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": ""}, {"prompt": " "}])
    with pytest.raises(DataError, match="no valid rows left"):
        _load(path, on_bad_row="quarantine")


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompts=st.lists(st.one_of(st.text(max_size=30), st.integers(), st.none()), min_size=1, max_size=12))
def test_every_row_is_kept_or_quarantined_never_dropped(tmp_path_factory, prompts):
    path = tmp_path_factory.mktemp("prop") / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts), encoding="utf-8")
    try:
        loaded = _load(str(path), on_bad_row="quarantine", max_chars=20)
    except DataError as exc:
        assert "no valid rows left" in str(exc)
        return
    kept = loaded.table.column("prompt").to_pylist()
    assert len(kept) + len(loaded.quarantined) == len(prompts)
    assert all(isinstance(p, str) and p.strip() and len(p) <= 20 for p in kept)
    assert len(set(loaded.table.column("id").to_pylist())) == len(kept)
