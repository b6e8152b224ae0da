"""Bad input, one table: every kind gives an error naming what and where (config key, file and
row), or is quarantined with its reason and counted, as ``data.on_bad_row`` says. Nothing is
dropped silently."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ray_align.cli import main
from ray_align.config import ConfigError, SourceConfig, load_config
from ray_align.sources import ContextLimit, DataError, load_source
from tests.unit.test_config import QUICKSTART


def _jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# --- configuration: fails before Ray starts, naming the dotted key ------------------------------
CONFIG_CASES = {
    "misspelled key": (["train.epocs=2"], "train.epocs: unknown key"),
    "unknown section": (["trainer.epochs=2"], "trainer: unknown key"),
    "wrong type": (["engine.batch_size=many"], "engine.batch_size"),
    "out of range": (["train.lr=-1"], "train.lr"),
    "not one of the choices": (["data.on_bad_row=ignore"], "data.on_bad_row"),
    "impossible combination": (["train.offload_params=true"], "offload_params needs zero_stage: 3"),
    "empty required list": (["evaluate.harmful=[]"], "evaluate.harmful"),
    "helpful data without responses (found before induce runs, not by build)": (
        ["data.helpful.response_column=null"], "data.helpful: Value error, needs response_column"),
    "override without =": (["train.epochs"], "key=value"),
    "NaN where a number goes": (["train.lr=.nan"], "train.lr"),
    "judge endpoint that is not HTTP": (
        ["judge.kind=http", "judge.http={url: 'ftp://h/v1', model: j}"],
        "judge.http.url: Value error, must start with http:// or https://"),
    "unknown judge endpoint setting": (
        ["judge.kind=http", "judge.http={url: 'http://h/v1', model: j, api_key: x}"],
        "judge.http.api_key: unknown key"),
    "http judge without its settings": (["judge.kind=http"],
                                        "judge: Value error, judge kind http needs judge.http"),
}


@pytest.mark.parametrize("kind", CONFIG_CASES)
def test_bad_config(kind):
    overrides, named = CONFIG_CASES[kind]
    with pytest.raises(ConfigError) as info:
        load_config(QUICKSTART, overrides)
    assert named in str(info.value)


def test_a_key_pasted_as_the_judge_key_variable_is_never_echoed():
    secret = "sk-pasted-0123456789abcdef"
    overrides = ["judge.kind=http",
                 f"judge.http={{url: 'http://h/v1', model: j, api_key_env: '{secret}'}}"]
    with pytest.raises(ConfigError) as info:
        load_config(QUICKSTART, overrides)
    assert "judge.http.api_key_env: Value error, must be the NAME" in str(info.value)
    assert secret not in str(info.value) and secret not in str(info.value.__context__ or "")


@pytest.mark.parametrize(("kind", "text", "named"), [
    ("missing config file", None, "not found"),
    ("invalid YAML", "run_dir: [unclosed", "not valid YAML"),
    ("config that is not a mapping", "- just\n- a list\n", "mapping"),
])
def test_bad_config_file(tmp_path, kind, text, named):
    path = tmp_path / "config.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError, match=named):
        load_config(path)


@pytest.mark.parametrize(("kind", "remove", "named"), [
    ("model directory without a tokenizer", ("tokenizer.json", "tokenizer_config.json"),
     "has no tokenizer files"),
    ("model directory without config.json", ("config.json",), "not a model directory"),
])
def test_bad_model_directory(tiny_model, tmp_path, capsys, kind, remove, named):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    for name in remove:
        (model / name).unlink(missing_ok=True)
    assert main(["check", str(QUICKSTART), f"model.path={model}"]) == 2
    error = capsys.readouterr().err
    assert "model.path" in error and named in error


# --- datasets: the file and row are named; row problems stop or go to quarantine --------------
ROW_CASES: dict[str, tuple[object, str]] = {
    "empty prompt": ("", "prompt: empty"),
    "whitespace prompt": ("   \n", "prompt: empty"),
    "non-string prompt": (42, "prompt: not a string"),
    "missing prompt": (None, "prompt: missing"),
    "1 MB prompt": ("x" * 1_000_000, "prompt: 1000000 characters, over the limit of 4000"),
    "prompt longer than the context": ("word " * 600, "tokens, over the 412"),
}


@pytest.mark.parametrize("kind", ROW_CASES)
def test_bad_row(tmp_path, kind):
    value, reason = ROW_CASES[kind]
    path = _jsonl(tmp_path / "prompts.jsonl", [{"prompt": "a fine prompt"}, {"prompt": value}])
    context = ContextLimit(count_tokens=lambda p: len(p.split()) + 12, limit=412,
                           why="model.max_model_len 512 minus induce.max_tokens 100")
    source = SourceConfig(path=path)
    with pytest.raises(DataError, match=rf"prompts.jsonl row 2: .*{reason}"):
        load_source(source, 4000, "error", context=context)
    kept = load_source(source, 4000, "quarantine", context=context)
    assert kept.table.num_rows == 1 and len(kept.quarantined) == 1
    assert kept.quarantined[0]["row"] == 2 and reason in kept.quarantined[0]["reason"]


def _write(tmp_path: Path, name: str, content: bytes | Callable[[Path], None]) -> str:
    path = tmp_path / name
    if callable(content):
        content(path)
    else:
        path.write_bytes(content)
    return str(path)


def _parquet(rows: dict) -> Callable[[Path], None]:
    return lambda path: pq.write_table(pa.table(rows), path)


FILE_CASES = {
    "missing file": (lambda t: str(t / "missing.jsonl"), {}, "missing.jsonl: cannot read"),
    "unknown format": (lambda t: _write(t, "prompts.txt", b"hi"), {}, "unknown format"),
    "empty file": (lambda t: _write(t, "empty.jsonl", b""), {}, "empty.jsonl: the dataset is empty"),
    "empty Parquet table": (
        lambda t: _write(t, "empty.parquet", _parquet({"prompt": pa.array([], pa.string())})),
        {}, "empty.parquet: the dataset is empty"),
    "invalid JSON line": (lambda t: _write(t, "broken.jsonl", b'{"prompt": "a"}\n{"prompt": \n'), {},
                          "broken.jsonl row 2: not valid JSON"),
    "invalid UTF-8": (lambda t: _write(t, "latin.jsonl", b'{"prompt": "a"}\n{"prompt": "caf\xe9"}\n'), {},
                      "latin.jsonl row 2: invalid UTF-8"),
    "truncated Parquet": (lambda t: _write(t, "cut.parquet", b"PAR1\x00\x00garbage"), {},
                          "cut.parquet: not a readable Parquet file"),
    "missing column": (lambda t: _write(t, "p.jsonl", b'{"text": "a"}\n'), {},
                       r"p.jsonl: missing column 'prompt' \(found: text\)"),
    "duplicate id": (
        lambda t: _write(t, "ids.jsonl", b'{"id": 1, "prompt": "a"}\n{"id": 1, "prompt": "b"}\n'),
        {"id_column": "id"}, "ids.jsonl row 2: duplicate id '1'"),
    "duplicate prompt": (lambda t: _write(t, "dup.jsonl", b'{"prompt": "a"}\n{"prompt": "a"}\n'), {},
                         "dup.jsonl row 2: duplicate prompt"),
    "NaN in a numeric id": (lambda t: _write(t, "nan.parquet", _parquet({"id": [1.0, math.nan],
                                                                           "prompt": ["a", "b"]})),
                            {"id_column": "id"}, "nan.parquet row 2: id: missing"),
    "empty CSV cell": (lambda t: _write(t, "cells.csv", b"id,prompt\n1,a\n2,\n"), {"id_column": "id"},
                       "cells.csv row 2: prompt: empty"),
}


@pytest.mark.parametrize("kind", FILE_CASES)
def test_bad_file(tmp_path, kind):
    make, columns, named = FILE_CASES[kind]
    with pytest.raises(DataError, match=named):
        load_source(SourceConfig(path=make(tmp_path), **columns), 4000, "error")


def test_the_table_covers_at_least_twenty_kinds():
    # + 3 config files, 2 model directories, 1 unparseable analysis (test_stages.py)
    kinds = len(CONFIG_CASES) + 3 + 2 + len(ROW_CASES) + len(FILE_CASES) + 1
    assert kinds >= 20
