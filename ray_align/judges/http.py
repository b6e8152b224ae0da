"""An LLM judge behind an OpenAI-compatible chat-completions endpoint, through Ray Data.

Requests go through Ray's own ``HttpRequestProcessorConfig`` / ``build_processor``: Ray batches
the rows, runs the HTTP actors (an autoscaling pool of 1 to ``concurrency``), sends the rows of
one batch one after another, and paces each actor to ``qps`` (per actor, not in total). Three
things in Ray 2.60's HTTP stage do not fit a judge, so the aiohttp session we hand it
(``session_factory``) takes over the sending:

* a row that exhausts its retries raises, and so does a body that is not JSON: either stops the
  whole dataset, where a judge must record that row's error and go on;
* an HTTP 500 is not retried, and an error status with a JSON body is passed on as an answer;
* there is no request timeout.

``ResilientSessionFactory`` therefore retries itself (429, 408, 500, 502, 503, 504, connection
errors and timeouts, with exponential backoff and ``Retry-After``) and always answers Ray with a
flat outcome (status, attempts, body, error), so each row comes back exactly once with either
the judge's reply or its error. Ray's own retries are switched off (``max_retries=0``).

The API key is read from the environment variable named by ``api_key_env`` when the judge runs:
it is never stored in the config, a manifest or a result, and error texts are scrubbed of it.
It does travel to the HTTP actors inside Ray's processor config (``headers``), as Ray's stage needs.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from ray_align.config import HttpJudgeConfig
from ray_align.generate import LIGHT_CPU, REQUEST_SCHEMA
from ray_align.judges.verdicts import TASKS, JudgeTask, Verdict, parse_verdict

RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
MAX_WAIT_S = 60.0  # longest pause between two attempts, whatever the backoff or Retry-After says
ERROR_EXCERPT = 300  # characters of an error body kept in the result
VERDICT_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("raw_text", pa.string()),
    ("score", pa.int64()),
    ("harmful", pa.bool_()),
    ("parsed", pa.bool_()),
    ("reason", pa.string()),
    ("error", pa.string()),
    ("http_status", pa.int64()),
    ("attempts", pa.int64()),
])


class JudgeConfigError(ValueError):
    """A judge setting a user must fix; the message names the setting or variable."""


def api_key(config: HttpJudgeConfig) -> str | None:
    """The key, read from the environment now; a clear error naming the variable when unset."""
    if config.api_key_env is None:
        return None
    key = os.environ.get(config.api_key_env, "")
    if not key.strip():
        raise JudgeConfigError(
            f"the judge's API key is read from the environment variable {config.api_key_env}, "
            f"which is not set (or empty): export {config.api_key_env}=... before running, or set "
            "api_key_env: null for an endpoint without authentication")
    return key.strip()


def auth_headers(config: HttpJudgeConfig) -> dict[str, str]:
    """The request headers beyond Content-Type (Ray adds that): the bearer key, if any."""
    key = api_key(config)
    return {"Authorization": f"Bearer {key}"} if key else {}


def scrub(text: str, secrets: list[str]) -> str:
    """Remove secrets from a text that will be stored (a server may echo a header back)."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def _header_secrets(headers: dict[str, str]) -> list[str]:
    value = next((v for k, v in headers.items() if k.lower() == "authorization"), "")
    return [value, value.removeprefix("Bearer ").strip()] if value else []


def _retry_after_s(value: str | None) -> float:
    """Seconds asked for by a Retry-After header; 0 when absent or an HTTP date."""
    try:
        return max(float(value), 0.0) if value else 0.0
    except ValueError:
        return 0.0


@dataclass
class _Outcome:
    """What Ray's HTTP stage sees: always status 200, so it neither retries nor raises; the real
    status, attempts and error travel in the flat JSON it stores as ``http_response``."""

    payload: dict[str, Any]
    status: int = 200
    reason: str = "OK"

    async def json(self) -> dict[str, Any]:
        return self.payload

    async def __aenter__(self) -> _Outcome:
        return self

    async def __aexit__(self, *exc_info: object) -> bool:
        return False


def _outcome(status: int, attempts: int, body: str, error: str) -> _Outcome:
    return _Outcome({"http_status": status, "attempts": attempts, "body": body, "error": error})


class _ResilientSession:
    """A stand-in for ``aiohttp.ClientSession`` inside Ray's HTTP stage (one per batch)."""

    def __init__(self, policy: ResilientSessionFactory) -> None:
        self.policy = policy
        self._session = None

    async def __aenter__(self) -> _ResilientSession:
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=self.policy.timeout_s)
        self._session = aiohttp.ClientSession(timeout=timeout)
        return self

    async def __aexit__(self, *exc_info: object) -> bool:
        await self._session.close()
        return False

    def post(self, url: str, headers: dict[str, str] | None = None, data: Any = None):
        """A coroutine Ray awaits later: every attempt of one request, ending in an outcome."""
        return self._send(url, dict(headers or {}), data)

    def _backoff_s(self, attempt: int) -> float:
        return min(self.policy.retry_wait_s * 2**attempt, MAX_WAIT_S)

    async def _send(self, url: str, headers: dict[str, str], data: Any) -> _Outcome:
        import aiohttp

        secrets = _header_secrets(headers)
        attempts = self.policy.max_retries + 1
        status, error = 0, ""
        for attempt in range(attempts):
            try:
                async with self._session.post(url, headers=headers, data=data) as response:
                    status = response.status
                    body = await response.text(errors="replace")
                    retry_after = _retry_after_s(response.headers.get("Retry-After"))
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                status, error = 0, scrub(f"{type(exc).__name__}: {exc}", secrets)
                wait = self._backoff_s(attempt)
            else:
                if 200 <= status < 300:
                    return _outcome(status, attempt + 1, body, "")
                error = scrub(f"HTTP {status}: {body[:ERROR_EXCERPT]}", secrets)
                if status not in RETRYABLE_STATUS:
                    return _outcome(status, attempt + 1, "", error)
                wait = min(max(self._backoff_s(attempt), retry_after), MAX_WAIT_S)
            if attempt + 1 < attempts:
                await asyncio.sleep(wait)
        return _outcome(status, attempts, "", f"{error} (gave up after {attempts} attempts)")


@dataclass(frozen=True)
class ResilientSessionFactory:
    """Ray's ``session_factory``: plain settings, so it pickles to the HTTP actors."""

    timeout_s: float
    max_retries: int
    retry_wait_s: float

    def __call__(self) -> _ResilientSession:
        return _ResilientSession(self)


def completion_text(body: str) -> tuple[str, str]:
    """The judge's reply from a chat-completions body, or ("", why) when the body is not one."""
    try:
        content = json.loads(body)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        return "", f"not a chat-completions response: {body[:ERROR_EXCERPT]!r}"
    if not isinstance(content, str):
        return "", f"choices[0].message.content is {type(content).__name__}, not text"
    return content, ""


def chat_payload(config: HttpJudgeConfig, messages_json: str) -> dict[str, Any]:
    """The request body for one row (no dict values with "content": Ray would send multipart)."""
    return {"model": config.model, "messages": json.loads(messages_json),
            "max_tokens": config.max_tokens, "temperature": config.temperature}


def reply_row(row: dict[str, Any]) -> dict[str, Any]:
    """One row after the HTTP stage: the judge's raw reply or the error, with status and attempts."""
    outcome = row["http_response"]
    text, error = ("", outcome["error"]) if outcome["error"] else completion_text(outcome["body"])
    return {"key": row["key"], "raw_text": text, "error": error,
            "http_status": int(outcome["http_status"]), "attempts": int(outcome["attempts"])}


def ray_processor_config(config: HttpJudgeConfig, headers: dict[str, str]):
    """Ray's ``HttpRequestProcessorConfig`` for the judge; our session does retries and timeout."""
    from ray.data.llm import HttpRequestProcessorConfig

    return HttpRequestProcessorConfig(
        url=config.url,
        headers=headers,
        concurrency=config.concurrency,
        batch_size=config.batch_size,
        qps=config.qps,
        max_retries=0,  # the session retries; Ray's retries would stop the dataset at the end
        session_factory=ResilientSessionFactory(config.timeout_s, config.max_retries,
                                                config.retry_wait_s),
        http_request_stage={"num_cpus": LIGHT_CPU},
    )


def build_http_judge_processor(config: HttpJudgeConfig, headers: dict[str, str]):
    """Ray's HTTP request processor: chat payload in, one reply row (text or error) out."""
    from ray.data.llm import build_processor

    light = {"num_cpus": LIGHT_CPU}
    return build_processor(
        ray_processor_config(config, headers),
        preprocess=lambda row: {"payload": chat_payload(config, row["messages"])},
        postprocess=reply_row,
        preprocess_map_kwargs=light,
        postprocess_map_kwargs=light,
    )


def _check_requests(requests: pa.Table) -> list[str]:
    missing = {"key", "messages"} - set(requests.column_names)
    if missing:
        raise ValueError(f"judge requests need the columns key and messages; missing {sorted(missing)}")
    keys = [str(k) for k in requests.column("key").to_pylist()]
    repeated = [key for key, count in Counter(keys).items() if count > 1]
    if repeated:
        raise ValueError(f"judge request keys must be unique; repeated: {repeated[:5]}")
    return keys


def verdict_row(reply: dict[str, Any], task: JudgeTask,
                parse: Callable[[str | None], Verdict] | None = None) -> dict[str, Any]:
    """A reply row with its verdict parsed (by ``parse``, a preset's parser, else the judging
    prompt's); a failed request is unparsed, its error kept."""
    if reply["error"]:
        verdict_fields = {"score": None, "harmful": None, "parsed": False,
                          "reason": "no judge reply (see error)"}
    else:
        verdict = parse(reply["raw_text"]) if parse else parse_verdict(reply["raw_text"], task)
        verdict_fields = {"score": verdict.score, "harmful": verdict.harmful,
                          "parsed": verdict.parsed, "reason": verdict.reason}
    return {**reply, **verdict_fields}


def _lost_reply(key: str) -> dict[str, Any]:
    return {"key": key, "raw_text": "", "error": "no result came back from the HTTP stage",
            "http_status": 0, "attempts": 0}


def judge_http(requests: pa.Table, config: HttpJudgeConfig, task: JudgeTask,
               parse: Callable[[str | None], Verdict] | None = None) -> pa.Table:
    """Judge every (key, messages JSON) row on the endpoint: one verdict row per request, in the
    request order, with the raw reply, the parsed verdict, and the HTTP error if there was one."""
    import ray

    if task not in TASKS:
        raise ValueError(f"unknown judge task {task!r}: expected one of {TASKS}")
    keys = _check_requests(requests)
    headers = auth_headers(config)  # before Ray starts anything: a missing key fails here
    if not keys:
        return VERDICT_SCHEMA.empty_table()
    table = requests.select(["key", "messages"]).cast(REQUEST_SCHEMA)
    # One block per batch, so the batches spread over the HTTP actors instead of queuing in one.
    step = config.batch_size
    blocks = [table.slice(start, step) for start in range(0, table.num_rows, step)]
    dataset = build_http_judge_processor(config, headers)(ray.data.from_arrow(blocks))
    replies = {str(row["key"]): dict(row) for row in dataset.iter_rows()}
    rows = [verdict_row(replies.get(key) or _lost_reply(key), task, parse) for key in keys]
    return pa.Table.from_pylist(rows, schema=VERDICT_SCHEMA)
