"""The HTTP judge end to end on a local Ray: Ray Data's HTTP request processor sends the judging
prompts to a fake OpenAI-compatible server that fails some requests first (500, 429), always
fails one (503) and rejects one (400). Every row must come back once, in order: retried rows
with their verdict, failed rows with their error; the key travels only in the header."""

from __future__ import annotations

import json

import pytest

from ray_align.config import HttpJudgeConfig
from ray_align.generate import make_requests
from ray_align.judges.http import VERDICT_SCHEMA, judge_http
from ray_align.judges.verdicts import harmlessness_messages
from tests.unit.test_judges import FakeChatServer, case_marker

pytestmark = pytest.mark.integration

KEY_ENV = "RAY_ALIGN_TEST_HTTP_JUDGE_KEY"
SECRET = "sk-integration-secret-0123456789"
CASES = ["ok", "ok", "ok", "ok", "ok", "ok", "flaky500", "flaky500", "flaky429", "down", "bad",
         "garbled"]


def test_http_judge_returns_one_verdict_per_row(local_ray, monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    keys = [f"{case}-{index}" for index, case in enumerate(CASES)]
    messages = [harmlessness_messages("a harmful request", f"a response {case_marker(case, key)}")
                for case, key in zip(CASES, keys, strict=True)]
    with FakeChatServer() as server:
        config = HttpJudgeConfig(url=server.url, model="judge", api_key_env=KEY_ENV, concurrency=2,
                                 batch_size=3, max_retries=2, retry_wait_s=0.05, qps=50, timeout_s=20,
                                 max_tokens=64)
        table = judge_http(make_requests(keys, messages), config, "harmlessness")

    assert table.schema == VERDICT_SCHEMA
    assert table.column("key").to_pylist() == keys  # every row once, in the request order
    rows = {row["key"]: row for row in table.to_pylist()}
    for key, row in rows.items():
        print(f"{key:12} attempts={row['attempts']} status={row['http_status']} parsed={row['parsed']} "
              f"error={row['error'][:60]!r}")

    for key in keys[:6]:
        assert rows[key]["parsed"] and rows[key]["attempts"] == 1 and rows[key]["error"] == ""
        assert (rows[key]["score"], rows[key]["harmful"]) == (9, False)
    for key, attempts in [("flaky500-6", 2), ("flaky500-7", 2), ("flaky429-8", 3)]:
        assert rows[key]["parsed"] and rows[key]["error"] == "", rows[key]
        assert rows[key]["attempts"] == attempts and server.attempts[key] == attempts

    down = rows["down-9"]
    assert not down["parsed"] and down["score"] is None and down["http_status"] == 503
    assert "HTTP 503" in down["error"] and "gave up after 3 attempts" in down["error"]
    assert down["attempts"] == 3 and server.attempts["down-9"] == 3
    bad = rows["bad-10"]
    assert not bad["parsed"] and "HTTP 400" in bad["error"] and bad["attempts"] == 1
    garbled = rows["garbled-11"]
    assert not garbled["parsed"] and garbled["error"] == "" and "no 'Score:' line" in garbled["reason"]

    assert len(server.authorizations) == sum(row["attempts"] for row in rows.values())
    assert set(server.authorizations) == {f"Bearer {SECRET}"}
    assert SECRET not in json.dumps(table.to_pylist())
