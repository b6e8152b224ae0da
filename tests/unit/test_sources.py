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


def _ids_by_prompt(path, **kw):
    table = _load(path, **kw).table
    return dict(zip(table.column("prompt").to_pylist(), table.column("id").to_pylist(), strict=True))


def test_ids_without_an_id_column_hash_the_text_not_the_row_or_the_format(tmp_path):
    rows = [{"prompt": "How do tides work?", "category": "science"},
            {"prompt": "Why is the sky blue?", "category": "physics"},
            {"prompt": "What is a prime number?", "category": "maths"}]
    first = _ids_by_prompt(_jsonl(tmp_path / "p.jsonl", rows))
    assert len(set(first.values())) == 3
    # Pinned: ids are the resume keys of runs already on disk, so the scheme may not drift.
    assert first["How do tides work?"] == "p-0e7a2f051350"
    # The same data in another format, in another order, with another value in an unrelated
    # column (and a column more), in another folder: every prompt keeps its id.
    (tmp_path / "other").mkdir()
    shuffled = [rows[2], rows[0], rows[1]]
    lines = [f"changed {i},{r['prompt']},x{i}\n" for i, r in enumerate(shuffled)]
    (tmp_path / "other" / "p.csv").write_text("category,prompt,extra\n" + "".join(lines))
    assert _ids_by_prompt(str(tmp_path / "other" / "p.csv")) == first
    # Its place in the file does not count either: the third row loaded on its own.
    assert _ids_by_prompt(_jsonl(tmp_path / "other" / "p.jsonl", rows), offset=2) == {
        rows[2]["prompt"]: first[rows[2]["prompt"]]}
    # The text does: one character changed is another id, and the others stay as they were.
    edited = [{**rows[0], "prompt": "How do tides work."}, *rows[1:]]
    (tmp_path / "edited").mkdir()
    again = _ids_by_prompt(_jsonl(tmp_path / "edited" / "p.jsonl", edited))
    assert again["How do tides work."] not in first.values()
    assert {p: again[p] for p in (rows[1]["prompt"], rows[2]["prompt"])} == {
        p: first[p] for p in (rows[1]["prompt"], rows[2]["prompt"])}


def test_offset_and_limit(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": f"p{i}"} for i in range(10)])
    assert _load(path, offset=3, limit=2).table.column("prompt").to_pylist() == ["p3", "p4"]


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
