"""Unit-test fixtures: a run context on the tiny model (a local Ray for Ray Data, no engines) and a
stand-in for generation."""

from __future__ import annotations

import json
import socket

import pyarrow as pa
import pytest

from ray_align import generate as generation
from ray_align.config import load_config
from ray_align.pipeline import Context
from ray_align.storage import RunDir
from tests.conftest import write_jsonl
from tests.unit.test_config import QUICKSTART


def as_table(requests) -> pa.Table:
    """Requests as one table, whether a stage passed a table or a Ray Dataset."""
    if isinstance(requests, pa.Table):
        return requests
    return pa.concat_tables(requests.iter_batches(batch_size=None, batch_format="pyarrow"))


def fake_generate(reply):
    """Stand-in for ``generate``: writes ``reply(key, messages)`` for every request (a table, or
    a Ray Dataset as the stages on Datasets pass), with the ``carry`` columns beside it."""

    def run(run_dir, folder, requests, model, engine, sampling, desc, lora=None, engines=None,
            carry=(), rows=0):
        requests = as_table(requests)
        texts = [reply(k, json.loads(m)) for k, m in zip(requests.column("key").to_pylist(),
                                                          requests.column("messages").to_pylist(),
                                                          strict=True)]
        table = pa.table({**{name: requests.column(name) for name in carry},
                          "key": requests.column("key"), "generated_text": pa.array(texts, pa.string()),
                          "num_input_tokens": pa.repeat(pa.scalar(1, pa.int64()), len(texts)),
                          "num_generated_tokens": pa.repeat(pa.scalar(3, pa.int64()), len(texts))})
        run_dir.write_table(table, *folder, "part-0.parquet")
        return generation.GenerationStats(len(texts), len(texts), 3 * len(texts), 1.0, engine_pools=1)

    return run


@pytest.fixture(scope="session")
def local_ray():
    """One local Ray per test process, for the stages that run on Ray Datasets (a bare Ray Data
    call would join whatever cluster /tmp/ray last recorded: a stale one hangs)."""
    import ray

    from ray_align.config import RayConfig
    from ray_align.pipeline import init_ray

    init_ray(RayConfig(num_cpus=2))
    yield
    ray.shutdown()


@pytest.fixture
def ctx(tmp_path, tiny_model, monkeypatch, local_ray):
    harmful = write_jsonl(tmp_path / "harmful.jsonl",
                          [{"id": f"h{i}", "prompt": f"harmful request {i}"} for i in range(6)])
    helpful = write_jsonl(tmp_path / "helpful.jsonl",
                          [{"id": f"g{i}", "prompt": f"helpful question {i}", "response": f"answer {i}"}
                           for i in range(10)])
    config = load_config(QUICKSTART, [
        f"run_dir={tmp_path / 'run'}", f"model.path={tiny_model}",
        f"data.harmful={{path: {harmful}, id_column: id}}",
        f"data.helpful={{path: {helpful}, id_column: id, response_column: response, limit: 6}}",
        f"evaluate.harmful=[{{path: {harmful}, offset: 6}}]",
        f"evaluate.helpful={{path: {helpful}, id_column: id, response_column: response, offset: 6}}",
    ])
    context = Context(config=config, run=RunDir(config.run_dir))
    context._ray_ready = True  # Ray is the session's (``local_ray``)
    return context


@pytest.fixture(scope="session")
def _gloo_group_of_one():
    """One gloo group of one process for the whole session. DeepSpeed caches the groups it
    derives from it, so a group destroyed and made again breaks every engine built after it."""
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield port
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def single_process_group(_gloo_group_of_one):
    """The session's group of one plus, for the module, the variables a launcher (Ray Train,
    torchrun) sets before DeepSpeed: DeepSpeed needs them, other modules should not see them."""
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_gloo_group_of_one), "RANK": "0",
           "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_SIZE": "1"}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        yield


@pytest.fixture
def offline_judge_in_process(monkeypatch):
    """The real offline judge (prepared under ``asset_home()``), scoring in this process
    instead of in a Ray Data job: unit tests start no Ray."""
    from ray_align.assets import asset_home
    from ray_align.judges import scoring
    from ray_align.judges.offline import OfflineJudgeBatch

    judge = OfflineJudgeBatch(home=str(asset_home()))
    monkeypatch.setattr(scoring, "_offline_rows", lambda ctx, table: judge(table).to_pylist())
    return judge
