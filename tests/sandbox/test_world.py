from collections import Counter

import pytest

from lion_ray.logic import prompts
from lion_ray.sandbox import world
from lion_ray.sandbox.tasks import FAMILY_BY_NAME, generate_tasks, parse_instruction

OPTS = world.WorldOptions()


def test_classify_recognises_the_three_prompts():
    assert world.classify(prompts.teacher_messages("Reverse 'kato'.")) == "teacher"
    assert world.classify(prompts.referee_messages("Reverse 'kato'.", "", "a", "b")) == "referee"
    assert world.classify(prompts.generator_messages("easy", "Reverse 'kato'.")) == "generator"
    assert world.classify([{"role": "user", "content": "hello there"}]) == "teacher"
    with pytest.raises(world.UnrecognisedRequest):
        world.classify([{"role": "system", "content": "no user message"}])


def test_teacher_answers_correctly():
    for task in generate_tasks(50, seed=2):
        kind, text = world.reply(prompts.teacher_messages(task.instruction))
        assert kind == "teacher" and text == task.answer


@pytest.mark.parametrize("template", ["alpaca", "compact"])
def test_teacher_answers_the_templated_requests_of_lion_ray_0_1(template):
    for task in generate_tasks(20, seed=3):
        legacy = [{"role": "user", "content": prompts.build_prompt(task.instruction, "", template)}]
        assert world.reply(legacy) == ("teacher", task.answer)


def test_teacher_error_rate_is_honoured():
    tasks = generate_tasks(400, seed=4)
    opts = world.WorldOptions(teacher_error_rate=0.25)
    wrong = sum(
        world.teacher_reply(prompts.teacher_messages(t.instruction), None, opts) != t.answer
        for t in tasks
    )
    assert 60 <= wrong <= 140


def _scores(text):
    from lion_ray.logic.referee import parse_scores

    return parse_scores(text)


def test_referee_order_swap_swaps_scores():
    for task in generate_tasks(60, seed=5):
        good, bad = task.answer, task.answer[::-1] + "x"
        for seed in (None, 1, 2):
            ab = _scores(
                world.referee_reply(
                    prompts.referee_messages(task.instruction, "", good, bad), seed, OPTS
                )
            )
            ba = _scores(
                world.referee_reply(
                    prompts.referee_messages(task.instruction, "", bad, good), seed, OPTS
                )
            )
            assert ab == (ba[1], ba[0])
            assert ab[0] == 10 and ab[1] < 10


def test_referee_malformed_rate_and_reask():
    opts = world.WorldOptions(malformed_rate=0.3)
    msgs = [
        prompts.referee_messages(t.instruction, "", t.answer, "")
        for t in generate_tasks(300, seed=6)
    ]
    bad = 0
    for m in msgs:
        try:
            _scores(world.referee_reply(m, None, opts))
        except ValueError:
            bad += 1
    assert 50 <= bad <= 130
    # a re-ask with another seed is an independent draw
    first_bad = next(
        m for m in msgs if "Score of the Assistant 2" not in world.referee_reply(m, None, opts)
    )
    assert any(_scores_ok(world.referee_reply(first_bad, s, opts)) for s in range(1, 6))


def _scores_ok(text):
    try:
        _scores(text)
        return True
    except ValueError:
        return False


def test_generator_hard_keeps_family_and_difficulty():
    for task in generate_tasks(100, seed=8, max_difficulty=4):
        new = parse_instruction(
            world.generator_reply(prompts.generator_messages("hard", task.instruction), 0, OPTS)
        )
        assert (
            new.family == task.family and task.difficulty <= new.difficulty <= task.difficulty + 1
        )


def test_generator_easy_moves_to_rarer_families():
    families = Counter()
    for task in generate_tasks(200, seed=9):
        new = parse_instruction(
            world.generator_reply(prompts.generator_messages("easy", task.instruction), 0, OPTS)
        )
        assert new.family != task.family
        assert FAMILY_BY_NAME[new.family].weight <= FAMILY_BY_NAME[task.family].weight
        families[new.family] += 1
    assert len(families) >= 3


def test_generator_is_deterministic_per_seed_and_varies_across_seeds():
    msgs = prompts.generator_messages("hard", "Reverse 'kato'.")
    assert world.generator_reply(msgs, 1, OPTS) == world.generator_reply(msgs, 1, OPTS)
    assert len({world.generator_reply(msgs, s, OPTS) for s in range(20)}) >= 15


def test_unknown_instructions_still_get_answers(seed_instructions):
    for inst in seed_instructions[:20]:
        _, answer = world.reply(prompts.teacher_messages(inst))
        assert answer.startswith("Here is a careful response")
        _, review = world.reply(prompts.referee_messages(inst, "", answer, "no idea"))
        s_teacher, s_other = _scores(review)
        assert s_teacher == 10 and s_other < 10
        _, new = world.reply(prompts.generator_messages("hard", inst), seed=0)
        assert parse_instruction(new) is not None
