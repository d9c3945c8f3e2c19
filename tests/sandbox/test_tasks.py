import random
from collections import Counter

import pytest

from lion_ray.sandbox.tasks import (
    CLOSING_PATTERNS,
    CLOSINGS,
    CONTEXT_PATTERNS,
    CONTEXTS,
    FAMILIES,
    FAMILY_BY_NAME,
    _choose_words,  # the LLM's word choice inside a form
    generate_tasks,
    is_correct,
    make_task,
    parse_instruction,
    rarer_families,
    score_answer,
)


def test_at_least_eight_families_with_several_phrasings():
    assert len(FAMILIES) >= 8
    assert all(len(f.phrasings) >= 3 for f in FAMILIES)
    # the generator writes like an LLM: at least eight surface forms per family
    assert all(len(set(f.forms)) >= 8 for f in FAMILIES)


def test_the_generator_uses_every_form_and_context_and_seeds_keep_theirs():
    rng = random.Random(3)
    family = FAMILY_BY_NAME["add"]
    llm = [make_task(family, rng, 2, like_an_llm=True).instruction for _ in range(600)]
    with_context = [t for t in llm if any(p.match(t) for p in CONTEXT_PATTERNS)]
    with_closing = [t for t in llm if any(p.search(t) for p in CLOSING_PATTERNS)]
    assert 0.2 < len(with_context) / len(llm) < 0.4 and 0.2 < len(with_closing) / len(llm) < 0.4
    cores = [parse_instruction(t).instruction for t in llm]
    used = {next(i for i, p in enumerate(family.patterns) if p.match(c)) for c in cores}
    assert used == set(range(len(family.forms)))
    assert len(set(cores)) > 0.8 * len(cores)  # word choices inside the forms vary too
    seeds = [make_task(family, rng, 2).instruction for _ in range(100)]
    assert all(any(p.match(t) for p in family.patterns[: len(family.phrasings)]) for t in seeds)


def test_generation_is_deterministic_and_distinct():
    a = generate_tasks(300, seed=7)
    assert [t.instruction for t in a] == [t.instruction for t in generate_tasks(300, seed=7)]
    assert [t.instruction for t in a] != [t.instruction for t in generate_tasks(300, seed=8)]
    assert len({t.instruction for t in a}) == 300
    assert set(Counter(t.family for t in generate_tasks(2000, seed=1))) == {
        f.name for f in FAMILIES
    }


def test_every_phrasing_parses_back_to_the_same_task():
    rng = random.Random(0)
    for family in FAMILIES:
        for idx in range(len(family.forms)):
            for difficulty in range(1, 6):
                task = make_task(family, rng, difficulty, phrasing=idx)
                for context, closing in [("", "")] + list(
                    zip(CONTEXTS, CLOSINGS + ("",), strict=True)
                ):
                    text = (
                        _choose_words(context, rng) + task.instruction + _choose_words(closing, rng)
                    )
                    parsed = parse_instruction(text)
                    assert parsed is not None, text
                    assert (parsed.family, parsed.answer, parsed.difficulty) == (
                        task.family,
                        task.answer,
                        task.difficulty,
                    )


@pytest.mark.parametrize(
    "instruction, answer",
    [
        ("Reverse 'kato'.", "otak"),
        ("Sort 'dcba' alphabetically.", "abcd"),
        ("What is 17 + 25?", "42"),
        ("Multiply 7 by 8.", "56"),
        ("Count 'a' in 'banana'.", "3"),
        ("Shift 'abz' by 2.", "cdb"),
        ("What comes next: 3, 7, 11, 15?", "19"),
        ("Uppercase 'mixo'.", "MIXO"),
        ("Max of 4, 91, 13?", "91"),
        ("Length of 'abcde'?", "5"),
    ],
)
def test_known_answers(instruction, answer):
    assert parse_instruction(instruction).answer == answer


def test_difficulty_knob_grows_the_payload():
    rng = random.Random(3)
    fam = FAMILY_BY_NAME["reverse"]
    lengths = [len(make_task(fam, rng, d).answer) for d in range(1, 6)]
    assert lengths == sorted(lengths) and lengths[0] < lengths[-1]
    add = FAMILY_BY_NAME["add"]
    easy = [int(make_task(add, rng, 1).answer) for _ in range(50)]
    hard = [int(make_task(add, rng, 5).answer) for _ in range(50)]
    assert max(easy) < 20 < sum(hard) / len(hard)


def test_scores_give_partial_credit():
    task = parse_instruction("Reverse 'kato'.")
    assert score_answer(task, "otak") == 10 and is_correct(task, " 'otak'. ")
    near, far, empty = (
        score_answer(task, "otka"),
        score_answer(task, "zzzzzz"),
        score_answer(task, ""),
    )
    assert 10 > near > far > empty == 1
    num = parse_instruction("What is 17 + 25?")
    assert score_answer(num, "42") == 10 and score_answer(num, "41") > score_answer(num, "90") > 1


def test_rarer_families_are_rarer():
    common = max(FAMILIES, key=lambda f: f.weight)
    assert all(f.weight < common.weight for f in rarer_families(common.name))
    rarest = min(FAMILIES, key=lambda f: f.weight)
    assert rarest.name not in {f.name for f in rarer_families(rarest.name)}


def test_requested_difficulty_is_exact():
    rng = random.Random(0)
    for family in FAMILIES:
        for d in range(1, 6):
            assert all(make_task(family, rng, d).difficulty == d for _ in range(50)), family.name


def test_the_target_distribution_covers_every_family_and_difficulty_equally():
    from lion_ray.sandbox.tasks import heldout_accuracy, stratified_tasks

    seeds = {t.instruction for t in generate_tasks(200, seed=1, max_difficulty=1)}
    tasks = stratified_tasks(3, seed=10_000, max_difficulty=3, exclude=seeds)
    cells = Counter((t.family, t.difficulty) for t in tasks)
    assert set(cells) == {(f.name, d) for f in FAMILIES for d in (1, 2, 3)}
    assert set(cells.values()) == {3}
    assert not seeds & {t.instruction for t in tasks}
    assert len({t.instruction for t in tasks}) == len(tasks)
    records = [t.as_record() for t in tasks]
    answers = {t.instruction: t.answer for t in tasks if t.difficulty == 1}
    result = heldout_accuracy(records, answers)
    assert result["by_difficulty"] == {"1": 1.0, "2": 0.0, "3": 0.0}
    assert result["accuracy"] == pytest.approx(1 / 3, abs=1e-4)
