"""The sandbox's Batch API and provider errors, driven by the real `openai` client."""

import json
import time

import openai
import pytest
from openai import OpenAI

from lion_ray.logic import prompts
from lion_ray.logic.referee import parse_scores
from lion_ray.sandbox.server import SandboxProcess, ServerOptions
from lion_ray.sandbox.tasks import generate_tasks


def _jsonl(tasks, prefix="r"):
    lines = [
        {
            "custom_id": f"{prefix}{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "sandbox-teacher",
                "messages": prompts.teacher_messages(t.instruction),
                "max_tokens": 32,
            },
        }
        for i, t in enumerate(tasks)
    ]
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def _wait(client, batch_id, timeout=30):
    deadline = time.time() + timeout
    batch = client.batches.retrieve(batch_id)
    while batch.status not in ("completed", "failed", "expired", "cancelled"):
        assert time.time() < deadline, batch.status
        time.sleep(0.1)
        batch = client.batches.retrieve(batch_id)
    return batch


def _lines(client, file_id):
    return (
        [json.loads(x) for x in client.files.content(file_id).text.splitlines()] if file_id else []
    )


def test_a_batch_from_upload_to_results():
    tasks = generate_tasks(12, seed=3)
    with SandboxProcess(ServerOptions(batch_delay_s=0.3)) as sb:
        client = OpenAI(base_url=sb.base_url, api_key="x")
        upload = client.files.create(file=("in.jsonl", _jsonl(tasks)), purpose="batch")
        assert client.files.retrieve(upload.id).bytes == len(_jsonl(tasks))
        assert client.files.content(upload.id).content == _jsonl(tasks)
        batch = client.batches.create(
            input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        assert batch.status == "in_progress" and batch.request_counts.total == 12
        done = _wait(client, batch.id)
        assert done.status == "completed" and done.request_counts.completed == 12
        answers = {
            line["custom_id"]: line["response"]["body"]["choices"][0]["message"]["content"]
            for line in _lines(client, done.output_file_id)
        }
        assert answers == {f"r{i}": t.answer for i, t in enumerate(tasks)}  # as online calls
        assert done.error_file_id is None
        assert [b.id for b in client.batches.list()] == [batch.id]
        assert sb.stats()["batch"]["served"] == 12 and sb.stats()["served"] == 0


def test_failed_lines_fail_on_their_first_submission_only():
    tasks = generate_tasks(40, seed=4)
    with SandboxProcess(ServerOptions(batch_delay_s=0.1, batch_fail_rate=0.25, fault_seed=1)) as sb:
        client = OpenAI(base_url=sb.base_url, api_key="x")

        def run(content):
            upload = client.files.create(file=("in.jsonl", content), purpose="batch")
            return _wait(
                client,
                client.batches.create(
                    input_file_id=upload.id,
                    endpoint="/v1/chat/completions",
                    completion_window="24h",
                ).id,
            )

        first = run(_jsonl(tasks))
        failed = {line["custom_id"] for line in _lines(client, first.error_file_id)}
        assert 0 < len(failed) == first.request_counts.failed < 40
        again = [t for i, t in enumerate(tasks) if f"r{i}" in failed]
        lines = [json.loads(x) for x in _jsonl(tasks).decode().splitlines()]
        retry = "".join(json.dumps(x) + "\n" for x in lines if x["custom_id"] in failed)
        second = run(retry.encode())
        assert second.request_counts.completed == len(again) and second.error_file_id is None
        assert sb.stats()["batch"]["lines_resubmitted_after_success"] == 0


def test_expired_batches_keep_what_finished_and_cancel_stops_one():
    tasks = generate_tasks(10, seed=5)
    with SandboxProcess(ServerOptions(batch_delay_s=0.2, batch_expire_rate=1.0)) as sb:
        client = OpenAI(base_url=sb.base_url, api_key="x")
        upload = client.files.create(file=("in.jsonl", _jsonl(tasks)), purpose="batch")
        done = _wait(
            client,
            client.batches.create(
                input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
            ).id,
        )
        assert done.status == "expired" and done.request_counts.completed == 5
        errors = _lines(client, done.error_file_id)
        assert {e["error"]["code"] for e in errors} == {"batch_expired"} and len(errors) == 5
    with SandboxProcess(ServerOptions(batch_delay_s=5)) as sb:
        client = OpenAI(base_url=sb.base_url, api_key="x")
        upload = client.files.create(file=("in.jsonl", _jsonl(tasks)), purpose="batch")
        batch = client.batches.create(
            input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        assert client.batches.cancel(batch.id).status == "cancelled"


def test_an_invalid_input_file_fails_the_batch():
    with SandboxProcess() as sb:
        client = OpenAI(base_url=sb.base_url, api_key="x")
        upload = client.files.create(file=("in.jsonl", b'{"custom_id": "a"}\n'), purpose="batch")
        batch = client.batches.create(
            input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        assert batch.status == "failed" and "line 1" in batch.errors.data[0].message


def test_structured_referee_output():
    with SandboxProcess() as sb:
        client = OpenAI(base_url=sb.base_url, api_key="x")
        review = (
            client.chat.completions.create(
                model="sandbox-referee",
                messages=prompts.referee_messages("What is 17 + 25?", "", "42", "41"),
                response_format=prompts.REFEREE_RESPONSE_FORMAT,
            )
            .choices[0]
            .message.content
        )
        data = json.loads(review)
        assert (data["score_assistant_1"], data["score_assistant_2"]) == parse_scores(review)
        assert data["score_assistant_1"] == 10 > data["score_assistant_2"]


def test_provider_errors_on_request():
    msgs = prompts.teacher_messages("What is 1 + 1?")
    with SandboxProcess(ServerOptions(faults=("insufficient_quota",))) as sb:
        client = OpenAI(base_url=sb.base_url, api_key="x", max_retries=0)
        with pytest.raises(openai.RateLimitError) as err:
            client.chat.completions.create(model="m", messages=msgs)
        assert err.value.code == "insufficient_quota"
    with SandboxProcess(ServerOptions(faults=("bad_param",))) as sb:
        client = OpenAI(base_url=sb.base_url, api_key="x", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="'max_tokens' is not supported"):
            client.chat.completions.create(model="m", messages=msgs, max_tokens=8)
        with pytest.raises(openai.BadRequestError, match="'temperature' does not support 0.2"):
            client.chat.completions.create(
                model="m", messages=msgs, max_completion_tokens=8, temperature=0.2
            )
        ok = client.chat.completions.create(model="m", messages=msgs, max_completion_tokens=8)
        assert ok.choices[0].message.content == "2"
    with SandboxProcess(ServerOptions(faults=("reset",))) as sb:
        client = OpenAI(base_url=sb.base_url, api_key="x", max_retries=0)
        with pytest.raises(openai.APIConnectionError):
            client.chat.completions.create(model="m", messages=msgs)
    with SandboxProcess(ServerOptions(faults=("gateway",))) as sb:
        client = OpenAI(base_url=sb.base_url, api_key="x", max_retries=0)
        with pytest.raises(openai.APIStatusError) as err:
            client.chat.completions.create(model="m", messages=msgs)
        assert err.value.status_code in (502, 504)
        assert sb.stats()["faults"] == {"gateway": 1}


def test_an_unknown_fault_is_refused():
    import subprocess
    import sys

    res = subprocess.run(
        [sys.executable, "-m", "lion_ray", "sandbox", "serve", "--fault", "meteor"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2 and "unknown fault 'meteor'" in res.stderr
