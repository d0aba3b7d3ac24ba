"""The API contract, fuzzed: schemathesis sends requests generated from `/openapi.json` (valid ones and
ones that break the schema) to a live server; none may answer 5xx, and every 4xx carries OpenAI's error
body. A bounded number of examples with a fixed seed, so a run is repeatable (FUZZ_EXAMPLES=400 for a
longer one: 400 per operation found nothing more than the default 60)."""

from __future__ import annotations

import os
from collections import Counter

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from live_server import MODEL, running_server, wait_idle

from engine.limits import RequestLimits
from engine.openapi import openapi_document

TINY_VOCAB = 151936  # the tiny Qwen3's (the real Qwen3 tokenizer's)
# The server's default limits: the fuzzer explores up to them and past them.
schema = schemathesis.openapi.from_dict(openapi_document(MODEL, TINY_VOCAB, RequestLimits()))
ANSWERS: Counter[tuple[str, int]] = Counter()  # (path, status) of every fuzzed request


@pytest.fixture(scope="module")
def fuzz_server(tiny_qwen3, tmp_path_factory):
    # A short context keeps every valid request's generation short (the fuzzer picks max_tokens freely).
    with running_server(tiny_qwen3, tmp_path_factory.mktemp("fuzz"), "model.max_model_len=64") as url:
        yield url


def test_the_served_document_is_the_contract(fuzz_server):
    assert httpx.get(f"{fuzz_server}/openapi.json").json() == openapi_document(MODEL, TINY_VOCAB, RequestLimits())


@schema.parametrize()
@settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", 60)),
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_no_5xx_and_every_4xx_is_an_openai_error(case, fuzz_server):
    response = case.call(base_url=fuzz_server, timeout=60)
    ANSWERS[(case.path, response.status_code)] += 1
    assert response.status_code < 500, f"{case.method} {case.path} {case.body!r:.300} -> {response.text:.300}"
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], response.text


def test_the_engine_is_healthy_and_holds_nothing_after_the_fuzzing(fuzz_server):
    # The fuzzer must have reached both sides of the contract on the generation routes.
    for path in ("/v1/chat/completions", "/v1/completions"):
        assert ANSWERS[(path, 200)] >= 3 and ANSWERS[(path, 400)] >= 3, ANSWERS
    assert httpx.get(f"{fuzz_server}/health").json()["status"] == "ok"
    wait_idle(fuzz_server)
