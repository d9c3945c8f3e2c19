"""The student behind Ray Serve, driven by the real `openai` client and by a browser."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest
from openai import OpenAI

from lion_ray.config import ServeConfig, StudentConfig
from lion_ray.engines.serving import deploy

from ..conftest import ADMIN_KEYS_ENV, MEMORIZED, MEMORIZED_B, ROOT, SERVE_KEYS_ENV
from ..helpers import Hammer, free_port, http_json, until

COMPACT = StudentConfig(prompt_format="compact")  # the tiny students' text template

KEY = "test-key-1"
ADMIN_KEY = "admin-key-1"


@pytest.fixture(scope="module")
def serve_port():
    return free_port()


@pytest.fixture(scope="module")
def served(ray_local, taught_student, taught_student_b, serve_port):
    from ray import serve

    settings = ServeConfig(
        port=serve_port,
        api_keys_env=SERVE_KEYS_ENV,
        admin_keys_env=ADMIN_KEYS_ENV,
        reload_allow=[str(taught_student.parent), str(taught_student_b.parent)],
        max_tokens_cap=64,
        max_prompt_tokens=200,
        max_body_bytes=20_000,
        max_batch_size=8,
    )
    url = deploy(settings, student=COMPACT, model_dir=str(taught_student))
    yield url, settings
    serve.shutdown()


def client(url: str, key: str | None = KEY) -> OpenAI:
    return OpenAI(base_url=f"{url}/v1", api_key=key or "none", max_retries=0, timeout=60)


def test_chat_and_completions_with_the_openai_client(served):
    url, _ = served
    c = client(url)
    for question, answer in MEMORIZED:
        r = c.chat.completions.create(
            model="lion-student", messages=[{"role": "user", "content": question}], max_tokens=12
        )
        assert r.choices[0].message.content == answer and r.choices[0].finish_reason == "stop"
        assert r.usage.completion_tokens == len(answer) + 1  # character tokens + EOS
    done = c.completions.create(
        model="lion-student", prompt=[q for q, _ in MEMORIZED], max_tokens=12
    )
    assert [ch.text for ch in done.choices] == [a for _, a in MEMORIZED]
    assert [m.id for m in c.models.list()] == ["lion-student"]


def test_streaming_by_sse(served):
    url, _ = served
    c = client(url)
    stream = c.chat.completions.create(
        model="lion-student",
        messages=[{"role": "user", "content": MEMORIZED[0][0]}],
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    deltas = [
        ch.choices[0].delta.content for ch in chunks if ch.choices and ch.choices[0].delta.content
    ]
    assert "".join(deltas) == MEMORIZED[0][1] and len(deltas) >= 2  # arrived in pieces
    assert chunks[-1].usage.completion_tokens == len(MEMORIZED[0][1]) + 1
    text = "".join(
        ch.choices[0].text
        for ch in c.completions.create(
            model="lion-student", prompt=MEMORIZED[1][0], max_tokens=12, stream=True
        )
    )
    assert text == MEMORIZED[1][1]


def test_bearer_keys(served):
    url, _ = served
    for key in (None, "wrong"):
        with pytest.raises(openai.AuthenticationError) as err:
            client(url, key).chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}]
            )
        assert err.value.body["code"] == "invalid_api_key"
    assert client(url, "test-key-2").models.list().data  # every configured key works
    page = urllib.request.urlopen(f"{url}/").read().decode()  # the page itself is public
    assert "lion-ray student" in page and "without authentication" not in page


def _admin(url: str, route: str, key: str | None, body: dict | None = None) -> tuple[int, dict]:
    return http_json(f"{url}/v1/admin/{route}", key, body)


def test_admin_routes_take_admin_keys_and_load_only_allowed_paths(served, taught_student, tmp_path):
    url, _ = served
    assert _admin(url, "status", None)[0] == 401
    status, body = _admin(url, "status", KEY)  # an ordinary user key is not an admin key
    assert status == 403 and body["error"]["code"] == "permission_denied"
    status, body = _admin(url, "status", ADMIN_KEY)
    assert status == 200 and body["model_dir"] == str(taught_student)
    assert _admin(url, "reload", KEY, {"model_dir": str(taught_student)})[0] == 403
    # an admin key still cannot make the server load a path outside the allowed roots
    outside = tmp_path / "elsewhere"
    shutil.copytree(taught_student, outside)
    for path in (str(outside), f"{taught_student.parent}/../{tmp_path.name}/elsewhere"):
        status, body = _admin(url, "reload", ADMIN_KEY, {"model_dir": path})
        assert status == 403 and "outside what this server may load" in body["error"]["message"]
    assert _admin(url, "status", ADMIN_KEY)[1]["model_dir"] == str(taught_student)


def _post(url: str, body: bytes, key: str = KEY) -> tuple[int, dict]:
    return http_json(f"{url}/v1/chat/completions", key, body, timeout=60)


def test_validation_and_caps(served):
    url, settings = served
    c = client(url)
    with pytest.raises(openai.BadRequestError) as err:
        c.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=1000
        )
    assert (
        err.value.body["code"] == "max_tokens_too_large" and err.value.body["param"] == "max_tokens"
    )
    with pytest.raises(openai.BadRequestError) as err:
        c.chat.completions.create(model="m", messages=[{"role": "user", "content": "long " * 100}])
    assert err.value.body["code"] == "context_length_exceeded"
    status, body = _post(url, json.dumps({"messages": []}).encode())
    assert (
        status == 422
        and body["error"]["param"] == "messages"
        and body["error"]["type"] == "invalid_request_error"
    )
    status, body = _post(
        url, json.dumps({"messages": [{"role": "robot", "content": "x"}]}).encode()
    )
    assert status == 422
    status, body = _post(url, b"{" + b" " * 30_000 + b"}")
    assert status == 413 and body["error"]["code"] == "request_too_large"
    status, body = _post(
        url, json.dumps({"messages": [{"role": "system", "content": "only system"}]}).encode()
    )
    assert status == 400 and "user message" in body["error"]["message"]


def test_backpressure_answers_503_not_collapse(ray_local, served, tiny_student):
    url, _ = served
    settings = ServeConfig(
        port=int(url.rsplit(":", 1)[1]),
        max_ongoing_requests=1,
        max_queued_requests=1,
        max_batch_size=1,
        max_tokens_cap=256,
    )
    bp = deploy(
        settings,
        student=COMPACT,
        model_dir=str(tiny_student),
        name="backpressure",
        route_prefix="/bp",
    )
    codes: list[int] = []

    def one():
        ask = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 200}
        codes.append(http_json(f"{bp}/v1/chat/completions", body=ask)[0])

    threads = [threading.Thread(target=one, daemon=True) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert codes.count(503) >= 3 and codes.count(200) >= 1 and set(codes) <= {200, 503}
    one()  # still healthy after the burst
    assert codes[-1] == 200
    from ray import serve

    serve.delete("backpressure")


def test_hot_swap_under_concurrent_requests(served, taught_student, taught_student_b):
    url, settings = served
    question = MEMORIZED[0][0]
    with Hammer(url, question, key=KEY) as load:
        deploy(settings, student=COMPACT, model_dir=str(taught_student_b))  # rolling update
        load.wait_for(MEMORIZED_B[0][1])
    assert not load.failures() and not load.refused(), load.outcomes[:3]
    seen = load.answers()
    assert seen[0] == MEMORIZED[0][1] and seen[-1] == MEMORIZED_B[0][1]
    assert set(seen) == {MEMORIZED[0][1], MEMORIZED_B[0][1]}
    # and back, through the admin route this time: the same architecture (a new round's
    # student), so the weights move into the loaded model
    back = {"model_dir": str(taught_student)}
    reply = _admin(url, "reload", ADMIN_KEY, back)[1]
    assert reply["swapped"] is True and reply["swap"]["how"] == "in_place", reply
    assert (
        client(url)
        .chat.completions.create(model="m", messages=[{"role": "user", "content": question}])
        .choices[0]
        .message.content
        == MEMORIZED[0][1]
    )


def test_a_swap_that_retires_first_answers_503_and_loses_no_answer(
    ray_local, served, taught_student, taught_student_b, tmp_path
):
    """Where two engines cannot fit (vLLM on one GPU), the old one retires first: requests
    that arrive meanwhile get 503 with Retry-After, those in flight finish. A swap to a
    model that cannot load fails visibly (admin reply, status) and the old one serves on."""
    from ray import serve

    url, _ = served
    broken = tmp_path / "broken"
    shutil.copytree(taught_student_b, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    settings = ServeConfig(
        port=int(url.rsplit(":", 1)[1]),
        swap="retire_first",
        admin_keys_env=ADMIN_KEYS_ENV,
        api_keys_env=SERVE_KEYS_ENV,
        reload_allow=[str(taught_student_b.parent), str(tmp_path)],
    )
    one = deploy(
        settings, student=COMPACT, model_dir=str(taught_student), name="one", route_prefix="/one"
    )
    question = MEMORIZED[0][0]
    ask = {"messages": [{"role": "user", "content": question}], "max_tokens": 12}
    # A long scoring call in flight holds the swap in its drain, so the window in which new
    # requests must get 503 lasts seconds however loaded the machine is (a bare swap of a
    # tiny student can end before a loaded proxy passes on the next request).
    long_rows = [{"instruction": question, "input": "", "answer": "abc " * 40}] * 3000
    in_flight = serve.get_app_handle("one").loss_rows.remote(long_rows)
    until(lambda: _admin(one, "status", ADMIN_KEY)[1]["inflight"] == 1, "the scoring call")
    with Hammer(one, question, key=KEY, threads=3) as load:
        asked = time.time()
        code, body = _admin(one, "reload", ADMIN_KEY, {"model_dir": str(taught_student_b)})
        assert code == 200 and body["swap"]["how"] == "retire_first", body
        scored = in_flight.result(timeout_s=120)
        assert scored["t1"] > asked  # still running when the swap began, and it finished
        assert scored["error"] == "" and len(scored["losses"]) == len(long_rows)
        load.wait_for(MEMORIZED_B[0][1], timeout_s=30)
    assert not load.failures(), load.failures()[:5]
    refused = load.refused()
    assert refused  # held off while no engine was loaded, not queued into a dead one
    assert {error for _, _, error, _ in refused} == {"model_swapping"}
    answers = load.answers()
    assert set(answers) == {MEMORIZED[0][1], MEMORIZED_B[0][1]}  # none cut, none wrong
    assert answers[-1] == MEMORIZED_B[0][1]
    assert {wait for _, _, _, wait in refused} == {"5"}  # the header a client backs off by

    # a swap that fails is answered as failed, shown in status, and the old student serves on
    code, body = _admin(one, "reload", ADMIN_KEY, {"model_dir": str(broken)})
    assert code == 500 and body["error"]["code"] == "swap_failed", body
    assert "still serving" in body["error"]["message"]
    status = _admin(one, "status", ADMIN_KEY)[1]
    assert status["last_swap"]["ok"] is False and status["last_swap"]["model_dir"] == str(broken)
    assert status["model_dir"] == str(taught_student_b) and not status["swapping"]
    code, body = http_json(f"{one}/v1/chat/completions", KEY, ask)
    assert code == 200 and body["choices"][0]["message"]["content"] == MEMORIZED_B[0][1]
    serve.delete("one")


def test_run_dir_follows_new_rounds(ray_local, served, taught_student, taught_student_b, tmp_path):
    from lion_ray.rundir import RunDir, StageRecord

    url, _ = served
    run = RunDir(str(tmp_path / "run"))
    shutil.copytree(taught_student, run.model_dir(1))
    run.manifest.record(StageRecord(key="round_1/imitation.train", rows=1))
    settings = ServeConfig(port=int(url.rsplit(":", 1)[1]), watch_interval_s=0.5)
    follow = deploy(
        settings, student=COMPACT, run_dir=run.uri, name="follow", route_prefix="/follow"
    )
    c = client(follow, None)
    page = urllib.request.urlopen(f"{follow}/").read().decode()  # an open server says so
    assert "without authentication" in page
    ask = {"model": "m", "messages": [{"role": "user", "content": MEMORIZED[0][0]}]}
    # no max_tokens: the answer gets the context the prompt leaves; too many is refused
    assert c.chat.completions.create(**ask).choices[0].message.content == MEMORIZED[0][1]
    with pytest.raises(openai.BadRequestError) as err:
        c.chat.completions.create(**ask, max_tokens=250)
    assert err.value.body["code"] == "context_length_exceeded" and "at most" in str(err.value)
    shutil.copytree(taught_student_b, run.model_dir(2))  # round 2 finishes
    run.manifest.record(StageRecord(key="round_2/imitation.train", rows=1))
    deadline = time.time() + 30
    while (
        time.time() < deadline
        and c.chat.completions.create(**ask).choices[0].message.content != MEMORIZED_B[0][1]
    ):
        time.sleep(0.5)
    assert c.chat.completions.create(**ask).choices[0].message.content == MEMORIZED_B[0][1]
    assert c.models.list().data[0].root.endswith("round_2/imitation/model")
    from ray import serve

    serve.delete("follow")


def _chromium() -> str:
    """Debian's chromium (installed here if missing: the test needs a real browser)."""
    path = shutil.which("chromium") or "/usr/bin/chromium"
    if not os.path.exists(path):
        res = subprocess.run(
            "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "
            "--no-install-recommends chromium",
            shell=True,
            capture_output=True,
            text=True,
        )
        if res.returncode != 0 or not os.path.exists(path):
            pytest.fail(f"could not install Debian's chromium: {res.stderr[-1000:]}")
    return path


@pytest.mark.slow
def test_chat_page_streams_a_reply_in_headless_chromium(served):
    from playwright.sync_api import sync_playwright

    url, _ = served
    shots = ROOT / "test-artifacts"
    shots.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=_chromium(),
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        page = browser.new_page()
        page.goto(f"{url}/")
        page.click("summary")  # the key lives under the collapsed settings
        page.fill("#key", KEY)
        page.fill("#prompt", MEMORIZED[0][0])
        page.click("#send")
        reply = page.locator(".assistant").last
        page.wait_for_function(
            "() => { const m = document.querySelectorAll('.assistant');"
            " return m.length && m[m.length - 1].dataset.streaming === 'false'; }",
            timeout=60_000,
        )
        assert reply.inner_text() == f"student: {MEMORIZED[0][1]}"
        assert (
            int(reply.get_attribute("data-chunks")) >= 2
        )  # the reply arrived streamed, piece by piece
        page.screenshot(path=str(shots / "chat-page.png"), full_page=True)
        browser.close()
    assert (shots / "chat-page.png").stat().st_size > 5_000
