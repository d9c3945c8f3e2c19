import json
import random

from rouge_score import rouge_scorer

from lion_ray.logic.dedup import (
    Deduper,
    RougeIndex,
    dedup,
    lcs_length,
    naive_decisions,
    rouge_l_f,
    rouge_tokens,
)
from lion_ray.sandbox.tasks import generate_tasks


def test_lcs_matches_rouge_score_table():
    rng = random.Random(0)
    for _ in range(2000):
        a = [rng.randrange(5) for _ in range(rng.randrange(0, 25))]
        b = [rng.randrange(5) for _ in range(rng.randrange(0, 25))]
        expected = rouge_scorer._lcs_table(a, b)[-1][-1] if a and b else 0
        assert lcs_length(a, b) == expected


def test_f_is_rouge_scores_float():
    rng = random.Random(1)
    words = ["the", "a", "of", "to", "write", "list", "name", "give", "three", "best", "why", "how"]
    for _ in range(500):
        c = " ".join(rng.choice(words) for _ in range(rng.randrange(1, 15)))
        r = " ".join(rng.choice(words) for _ in range(rng.randrange(1, 15)))
        ct, rt = rouge_tokens(c), rouge_tokens(r)
        ref = rouge_scorer._score_lcs(ct, rt).fmeasure
        ours = rouge_l_f(lcs_length([hash(t) for t in ct], [hash(t) for t in rt]), len(ct), len(rt))
        assert ours == ref  # bit for bit, not approximately


def _perturb(text, rng):
    words = text.split()
    for _ in range(rng.randrange(1, 4)):
        op = rng.randrange(3)
        i = rng.randrange(len(words))
        if op == 0 and len(words) > 1:
            del words[i]
        elif op == 1:
            words.insert(i, rng.choice(["please", "quickly", "new", "the", "short"]))
        else:
            words[i] = rng.choice(["story", "list", "poem", "email", "summary"])
    return " ".join(words)


def test_decisions_equal_rouge_score_on_seed_tasks(seed_instructions):
    rng = random.Random(2)
    pool = seed_instructions[:120]
    candidates = seed_instructions[120:] + [_perturb(rng.choice(pool), rng) for _ in range(80)]
    candidates += [
        _perturb(c, rng) for c in candidates[:30]
    ]  # near-duplicates of earlier candidates
    rng.shuffle(candidates)
    fast = dedup(pool, candidates, 0.7)
    assert fast == naive_decisions(pool, candidates, 0.7)
    assert 0 < sum(fast) < len(fast)  # the test exercises both outcomes


def test_decisions_equal_on_sandbox_tasks_and_other_thresholds():
    pool = [t.instruction for t in generate_tasks(150, seed=3)]
    cands = [t.instruction for t in generate_tasks(150, seed=4)]
    for threshold in (0.5, 0.7, 0.9):
        assert dedup(pool, cands, threshold) == naive_decisions(pool, cands, threshold)


def test_same_payload_decisions_equal_the_reference():
    rng = random.Random(5)
    pool = [t.instruction for t in generate_tasks(300, seed=3, max_difficulty=2)]
    cands = [t.instruction for t in generate_tasks(200, seed=4, max_difficulty=2)]
    cands += [_perturb(rng.choice(pool), rng) for _ in range(60)]
    rng.shuffle(cands)
    fast = dedup(pool, cands, 0.7, "same_payload")
    assert fast == naive_decisions(pool, cands, 0.7, "same_payload")
    plain = dedup(pool, cands, 0.7)
    # it only ever keeps more, and here it does
    assert all(f or not p for f, p in zip(fast, plain, strict=True)) and sum(fast) > sum(plain)


def test_same_payload_keeps_other_questions_of_one_template_and_stops_copies():
    pool = [t.instruction for t in generate_tasks(300, seed=3, max_difficulty=2)]
    pool += ["Add 301 and 402.", "Reverse the word 'kato'."]
    deduper = Deduper(pool, 0.7, "same_payload")
    plain = Deduper(pool, 0.7)
    # same template, other payload: a different question (the paper's rule rejects it)
    for text in ("Add 301 and 403.", "Reverse the word 'kati'."):
        assert plain.reason(text) == "similar_to_pool"
        assert Deduper(pool, 0.7, "same_payload").reason(text) is None
    # the same question in nearly the same words: a copy
    assert deduper.reason("Sum 301 and 402.") == "similar_to_pool"
    assert deduper.nearest("Sum 301 and 402.", "similar_to_pool") == (0.75, "Add 301 and 402.")
    assert deduper.reason("Add 707 and 808.") is None
    assert deduper.reason("Sum 707 and 808.") == "similar_to_accepted"
    try:
        Deduper(pool, 0.7, "minhash")
    except ValueError as exc:
        assert "same_payload" in str(exc)
    else:
        raise AssertionError("an unknown similarity was accepted")


def test_exact_threshold_is_not_rejected():
    # LCS 7 of 10 and 10 tokens: F is 0.7 in rouge-score's arithmetic, and 0.7 is not > 0.7
    base = "w1 w2 w3 w4 w5 w6 w7 w8 w9 w10"
    cand = "w1 w2 w3 w4 w5 w6 w7 x8 x9 x10"
    assert rouge_scorer._score_lcs(rouge_tokens(cand), rouge_tokens(base)).fmeasure <= 0.7
    assert dedup([base], [cand], 0.7) == naive_decisions([base], [cand], 0.7) == [True]


def test_tokenless_and_unknown_tokens():
    index = RougeIndex.build(["Write a poem.", "¿¡!?"], 0.7)
    assert index.max_match("…") == (0.0, -1)  # no rouge tokens: F is 0 with everything
    assert not index.exceeds("completely novel vocabulary here")
    assert index.exceeds("write a poem")


def test_accepted_candidates_are_compared_in_order_and_merge_correctly():
    deduper = Deduper(["alpha beta gamma delta"], 0.7)
    deduper.accepted.merge_every = 3  # exercise the static/dynamic merge
    texts = [f"tell me about topic {i} in detail" for i in range(10)] + [
        "alpha beta gamma delta epsilon"
    ]
    decisions = [deduper.offer(t) for t in texts]
    assert decisions == naive_decisions(["alpha beta gamma delta"], texts, 0.7)
    assert decisions[0] and not all(decisions)


def test_seed_file_against_itself_rejects_everything(seed_tasks_path):
    lines = [json.loads(x)["instruction"] for x in seed_tasks_path.read_text().splitlines()]
    assert not any(dedup(lines, lines[:40], 0.7))
