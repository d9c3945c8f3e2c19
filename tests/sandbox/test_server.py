"""The sandbox over real HTTP, driven by the real `openai` client."""

import os
import subprocess
import sys
import time

import openai
import pytest
from openai import OpenAI

from lion_ray.logic import prompts
from lion_ray.logic.referee import parse_scores
from lion_ray.sandbox.server import SandboxProcess, ServerOptions, TokenBucket, format_reset


def test_models_route(openai_client):
    ids = {m.id for m in openai_client.models.list()}
    assert {"sandbox-teacher", "sandbox-referee", "sandbox-generator"} <= ids


def test_teacher_referee_generator_calls(openai_client):
    r = openai_client.chat.completions.create(
        model="sandbox-teacher", messages=prompts.teacher_messages("What is 17 + 25?")
    )
    assert r.choices[0].message.content == "42" and r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens == 1
    review = (
        openai_client.chat.completions.create(
            model="sandbox-referee",
            messages=prompts.referee_messages("What is 17 + 25?", "", "42", "41"),
        )
        .choices[0]
        .message.content
    )
    assert parse_scores(review)[0] == 10 > parse_scores(review)[1]
    new = (
        openai_client.chat.completions.create(
            model="sandbox-generator",
            messages=prompts.generator_messages("hard", "What is 17 + 25?"),
            seed=3,
        )
        .choices[0]
        .message.content
    )
    assert new and new != "What is 17 + 25?"


def test_streaming_with_usage(openai_client):
    stream = openai_client.chat.completions.create(
        model="sandbox-referee",
        messages=prompts.referee_messages("Reverse 'kato'.", "", "otak", "kato"),
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len([c for c in chunks if c.choices]) > 3  # really streamed in pieces
    assert parse_scores(text)[0] == 10
    assert chunks[-1].usage.completion_tokens > 0
    assert any(c.choices and c.choices[0].finish_reason == "stop" for c in chunks)


def test_referee_order_swap_over_http(openai_client):
    for task in ["Sort 'dcba' alphabetically.", "Max of 4, 91, 13?", "Shift 'abz' by 2."]:

        def scores(a, b, task=task):
            msgs = prompts.referee_messages(task, "", a, b)
            return parse_scores(
                openai_client.chat.completions.create(model="r", messages=msgs)
                .choices[0]
                .message.content
            )

        ab, ba = scores("wrong answer", "x"), scores("x", "wrong answer")
        assert ab == ba[::-1]


def test_unrecognised_request_is_an_openai_shaped_400(openai_client):
    with pytest.raises(openai.BadRequestError) as err:
        openai_client.chat.completions.create(
            model="x", messages=[{"role": "system", "content": "no user message"}]
        )
    assert err.value.status_code == 400
    assert err.value.body["code"] == "unrecognised_prompt" and "user" in err.value.body["message"]
    # anything else a user asks is an instruction for the teacher
    hi = openai_client.chat.completions.create(
        model="x", messages=[{"role": "user", "content": "hi"}]
    )
    assert hi.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="messages"):
        openai_client.chat.completions.create(model="x", messages=[])


def test_max_tokens_cuts_off_with_length(openai_client):
    r = openai_client.chat.completions.create(
        model="r",
        messages=prompts.referee_messages("Reverse 'kato'.", "", "otak", "x"),
        max_tokens=5,
    )
    assert r.choices[0].finish_reason == "length" and len(r.choices[0].message.content) <= 20


def test_rate_limit_429_with_headers():
    # 30 rpm banked over 4 s: 2 requests, one more every 2 s, so the six requests below meet
    # an empty bucket unless a loaded machine takes 2 s to send them
    with SandboxProcess(ServerOptions(rpm=30, burst_s=4.0)) as sb:
        client = OpenAI(base_url=sb.base_url, api_key="x", max_retries=0)
        msgs = prompts.teacher_messages("What is 1 + 2?")
        ok, limited = 0, None
        for _ in range(6):
            try:
                raw = client.chat.completions.with_raw_response.create(model="t", messages=msgs)
                ok += 1
                assert raw.headers["x-ratelimit-limit-requests"] == "30"
            except openai.RateLimitError as exc:
                limited = exc
        assert ok == 2
        h = limited.response.headers
        assert int(h["retry-after"]) >= 1 and int(h["retry-after-ms"]) > 0
        assert h["x-ratelimit-remaining-requests"] == "0" and h[
            "x-ratelimit-reset-requests"
        ].endswith("s")  # "3.99s": the bucket is full again in under 4 s
        assert limited.body["code"] == "rate_limit_exceeded"
        time.sleep(float(h["retry-after-ms"]) / 1000 + 0.05)
        client.chat.completions.create(model="t", messages=msgs)  # allowed again after Retry-After
        assert sb.stats()["rejected"]["rate_limit_requests"] == 4


def test_token_limit_429():
    # 600 tpm banked over 10 s: 100 tokens, refilled 10 per second
    with SandboxProcess(ServerOptions(tpm=600, burst_s=10.0)) as sb:
        client = OpenAI(base_url=sb.base_url, api_key="x", max_retries=0)
        msgs = prompts.teacher_messages("What is 1 + 2?")
        client.chat.completions.create(model="t", messages=msgs, max_tokens=20)
        with pytest.raises(openai.RateLimitError) as err:
            client.chat.completions.create(model="t", messages=msgs, max_tokens=90)
        assert err.value.response.headers["x-ratelimit-limit-tokens"] == "600"
        assert sb.stats()["rejected"]["rate_limit_tokens"] == 1


def test_fault_rates_within_tolerance():
    opts = ServerOptions(error_rate=0.2, malformed_rate=0.2, fault_seed=1)
    with SandboxProcess(opts) as sb:
        client = OpenAI(base_url=sb.base_url, api_key="x", max_retries=0)
        errors, malformed, n = 0, 0, 300
        for i in range(n):
            msgs = prompts.referee_messages(f"What is {i} + 1?", "", str(i + 1), "0")
            try:
                text = (
                    client.chat.completions.create(model="r", messages=msgs)
                    .choices[0]
                    .message.content
                )
            except openai.InternalServerError:
                errors += 1
                continue
            except openai.APIStatusError as exc:
                assert exc.status_code == 503
                errors += 1
                continue
            try:
                parse_scores(text)
            except ValueError:
                malformed += 1
        assert 0.12 * n <= errors <= 0.28 * n
        served = n - errors
        assert 0.1 * served <= malformed <= 0.3 * served
        stats = sb.stats()
        assert stats["rejected"]["server_error"] == errors and stats["served"] == served


def test_latency_distribution_and_slow_responses():
    with SandboxProcess(ServerOptions(latency_ms=60, latency_sd_ms=20, fault_seed=2)) as sb:
        client = OpenAI(base_url=sb.base_url, api_key="x", max_retries=0)
        msgs = prompts.teacher_messages("What is 1 + 2?")
        times = []
        for _ in range(25):
            t = time.perf_counter()
            client.chat.completions.create(model="t", messages=msgs)
            times.append(time.perf_counter() - t)
        mean = sum(times) / len(times)
        # 60 ms injected on top of a local round trip (more on a loaded machine)
        assert 0.04 <= mean <= 0.3 and max(times) - min(times) > 0.01
    with SandboxProcess(ServerOptions(slow_rate=1.0, slow_ms=3000)) as sb:
        client = OpenAI(base_url=sb.base_url, api_key="x", max_retries=0, timeout=0.5)
        with pytest.raises(openai.APITimeoutError):
            client.chat.completions.create(model="t", messages=msgs)
        assert sb.stats()["slow"] == 1


def test_bearer_key_required_when_configured():
    env = {"SANDBOX_TEST_KEY": "sk-test-123"}
    with SandboxProcess(ServerOptions(api_key_env="SANDBOX_TEST_KEY"), env=env) as sb:
        msgs = prompts.teacher_messages("What is 1 + 2?")
        with pytest.raises(openai.AuthenticationError):
            OpenAI(base_url=sb.base_url, api_key="wrong", max_retries=0).chat.completions.create(
                model="t", messages=msgs
            )
        good = OpenAI(base_url=sb.base_url, api_key="sk-test-123", max_retries=0)
        assert (
            good.chat.completions.create(model="t", messages=msgs).choices[0].message.content == "3"
        )
        assert sb.stats()["rejected"]["unauthorized"] == 1


def test_cli_rpm_enforced_on_a_burst():
    """`lion-ray sandbox serve --rpm 60 --burst-s 10`: a burst beyond the limit gets 429s
    with Retry-After (10 banked, one more per second: 40 requests sent within 10 s, as even a
    loaded machine does, meet at least 20 refusals)."""
    serve = ["sandbox", "serve", "--port", "0", "--rpm", "60", "--burst-s", "10"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "lion_ray", *serve],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ},
    )
    try:
        url = proc.stdout.readline().split()[1]
        client = OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        msgs = prompts.teacher_messages("What is 2 + 2?")
        codes = []
        for _ in range(40):  # far faster than one per second
            try:
                client.chat.completions.create(model="t", messages=msgs)
                codes.append(200)
            except openai.RateLimitError as exc:
                assert int(exc.response.headers["retry-after"]) >= 1
                codes.append(429)
        import json
        import urllib.request

        stats = json.loads(urllib.request.urlopen(f"{url}/stats").read())
        assert codes.count(429) >= 20 and stats["rejected_429"] == codes.count(429)
        assert stats["max_accepted_in_window"]["requests"] == codes.count(200) <= 20
    finally:
        proc.terminate()
        proc.wait(10)


def test_bucket_and_reset_format():
    b = TokenBucket(600, burst_s=1.0)
    now = b.stamp
    for _ in range(10):
        assert b.wait_for(1, now) == 0
        b.take(1)
    assert b.wait_for(1, now) == pytest.approx(0.1)
    assert (
        format_reset(0.02) == "20ms" and format_reset(1.5) == "1.5s" and format_reset(360) == "6m0s"
    )
