import pytest

from lion_ray.engines.limiter import RateLimit, parse_duration


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_requests_are_spaced_at_the_rate_after_a_small_burst():
    clock = Clock()
    lim = RateLimit(rpm=600, tpm=10**9, burst_s=0.25, headroom=1.0, clock=clock)
    delays = [lim.reserve(1) for _ in range(10)]
    assert delays[:3] == [0.0, 0.0, 0.0]  # 0.25 s of burst at 10/s
    steps = [round(b - a, 6) for a, b in zip(delays[3:], delays[4:], strict=False)]
    assert steps == [0.1] * len(steps)


def test_token_limit_dominates_for_big_requests():
    clock = Clock()
    lim = RateLimit(rpm=10**6, tpm=6000, burst_s=0.0, headroom=1.0, clock=clock)  # 100 tokens/s
    assert lim.reserve(50) == 0.0
    assert lim.reserve(50) == pytest.approx(0.5)
    assert lim.reserve(100) == pytest.approx(1.0)


def test_pause_holds_everyone_then_schedule_resumes():
    clock = Clock()
    lim = RateLimit(rpm=60_000, tpm=10**9, burst_s=0.0, headroom=1.0, clock=clock)
    lim.pause(2.0)
    assert lim.reserve(1) == pytest.approx(2.0)
    assert lim.reserve(1) == pytest.approx(2.001)
    clock.t += 5
    assert lim.reserve(1) == 0.0


def test_headers_lower_the_rate_and_pause_when_exhausted():
    clock = Clock()
    lim = RateLimit(rpm=6000, tpm=10**9, headroom=1.0, clock=clock)
    lim.observe({"x-ratelimit-limit-requests": "600", "x-ratelimit-remaining-requests": "12"})
    assert lim.rpm == 600 and lim.stats.adapted_rpm == 600
    lim.observe({"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1.5s"})
    assert lim.paused_until == pytest.approx(clock.t + 1.5)


def test_budget_refuses_and_settles():
    lim = RateLimit(rpm=10**6, tpm=10**9, budget_usd=1.0, clock=Clock())
    assert lim.reserve(1, 0.6) >= 0
    assert lim.reserve(1, 0.6) == -1  # 0.6 reserved + 0.6 > 1.0
    lim.settle(0.6, 0.1)  # the first request cost less than its worst case
    assert lim.reserve(1, 0.6) >= 0 and lim.spent_usd == pytest.approx(0.1)
    assert lim.stats.refused_budget == 1


@pytest.mark.parametrize(
    "text, seconds", [("20ms", 0.02), ("1.5s", 1.5), ("6m0s", 360), ("1h2m3s", 3723), ("2", 2.0)]
)
def test_parse_duration(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


def test_parse_duration_rejects_garbage():
    assert parse_duration("soon") is None and parse_duration("") is None


def test_a_request_whose_caller_gave_up_before_sending_holds_no_reservation(tmp_path):
    """A stage that stops (the budget, a fatal error) cancels the requests it has not sent.
    One still waiting in the limiter for its send time, and one the limiter already gave a
    ticket, are released: the ledger keeps only what was sent, so `lion-ray status` does not
    count the cancelled ones at their worst case until a resume."""
    import asyncio

    from lion_ray.engines import ledger
    from lion_ray.engines.limiter import Limiter

    async def main():
        limiter = Limiter(rpm=60, tpm=10**9, budget_usd=10.0, ledger_dir=str(tmp_path))
        limiter.limit.burst_s = 0.0  # one request a second: the later ones wait here
        first = await limiter.reserve(10, 0.5, "s", request="r1")  # ticketed, never sent
        waiting = [
            asyncio.create_task(limiter.reserve(10, 0.5, "s", request=f"r{i}")) for i in (2, 3)
        ]
        await asyncio.sleep(0.1)
        await limiter.give_up("r3", 0.5, "s")  # still waiting for its send time
        await limiter.give_up("r1", 0.5, "s")  # its caller stopped after the ticket came
        second, third = await asyncio.gather(*waiting)
        await limiter.report(second[1], 0.5, 0.2, stage="s")  # sent, and billed
        return first, second, third, limiter

    first, second, third, limiter = asyncio.run(main())
    assert first[1] and second[1] and third == (-2.0, None)
    totals = ledger.load(str(tmp_path))
    assert totals.open == {} and totals.spent_usd == pytest.approx(0.2)
    assert limiter.limit.reserved_usd == pytest.approx(0.0)
