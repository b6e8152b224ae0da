"""docs/config.md is generated from the config schema and must stay current with it."""

import json
from pathlib import Path

import pytest
from pydantic import BaseModel

from ray_align.cli import build_parser, main
from ray_align.config import Config
from ray_align.config_reference import REGENERATE, json_schema, reference

ROOT = Path(__file__).resolve().parents[2]


def test_the_checked_in_config_reference_is_current():
    checked_in = (ROOT / "docs" / "config.md").read_text(encoding="utf-8")
    assert checked_in == reference(), (
        f"docs/config.md is out of date with ray_align/config.py: regenerate it with `{REGENERATE}` "
        "(from the repository root) and commit it")


def _leaf_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        keys.append(key)
        nested = [a for a in [field.annotation, *getattr(field.annotation, "__args__", ())]
                  if isinstance(a, type) and issubclass(a, BaseModel)]
        if nested:
            is_list = getattr(field.annotation, "__origin__", None) is list
            keys += _leaf_keys(nested[0], f"{key}[]." if is_list else f"{key}.")
    return keys


def test_every_key_of_the_schema_has_a_row_in_schema_order():
    text = reference()
    rows = [line.split("|")[1].strip().strip("`") for line in text.splitlines()
            if line.startswith("| `")]
    sections = {n for n, f in Config.model_fields.items() if isinstance(f.annotation, type)
                and issubclass(f.annotation, BaseModel)}  # a heading each, not a row
    assert rows == [key for key in _leaf_keys(Config) if key not in sections]


def test_nested_defaults_are_the_ones_the_parent_section_sets():
    text = reference()
    # SamplingConfig's own default is 256 tokens at 0.7; the evaluation and judge differ
    assert "| `evaluate.sampling.max_tokens` | int (>= 1) | `128` |" in text
    assert "| `judge.sampling.temperature` | float (>= 0) | `0.0` |" in text
    assert "| `induce.max_tokens` | int (>= 1) | `256` |" in text
    assert "| `evaluate.harmful` | list of section (at least 1) | required |" in text
    assert "| `engine.pool` | [int, int] | `[1, 1]` |" in text
    assert "Execution setting" in next(line for line in text.splitlines()
                                       if line.startswith("| `train.max_failures`"))


def test_cli_prints_the_reference_and_the_json_schema(capsys):
    assert main(["config", "--reference"]) == 0
    assert capsys.readouterr().out == reference()
    assert main(["config", "--schema"]) == 0
    out = capsys.readouterr().out
    assert out == json_schema()
    schema = json.loads(out)
    assert list(schema["properties"]) == list(Config.model_fields)
    assert schema["additionalProperties"] is False


def test_config_command_needs_one_of_its_two_outputs(capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["config", "--help"])
    assert info.value.code == 0
    assert "--reference" in capsys.readouterr().out
    for argv in (["config"], ["config", "--schema", "--reference"]):
        with pytest.raises(SystemExit) as info:
            build_parser().parse_args(argv)
        assert info.value.code == 2
