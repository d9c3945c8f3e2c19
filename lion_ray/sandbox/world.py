"""What the sandbox says: pure functions from a chat request to the assistant's text.

Every response is a deterministic function of the messages, the request's ``seed`` and
the world's options, so a cached response and a fresh one are the same text, and a
re-ask with another ``seed`` gets an independent draw (e.g. for malformed reviews).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import random
from dataclasses import dataclass

from lion_ray.logic import prompts
from lion_ray.sandbox.tasks import (
    FAMILIES,
    FAMILY_BY_NAME,
    Task,
    make_task,
    normalize_answer,
    parse_instruction,
    rarer_families,
    score_answer,
)

CALL_KINDS = ("teacher", "referee", "generator")


@dataclass(frozen=True)
class WorldOptions:
    teacher_error_rate: float = 0.0
    malformed_rate: float = 0.0


class UnrecognisedRequest(ValueError):
    """A request that is none of lion-ray's teacher, referee or generator prompts."""


def _rng(*parts: object) -> random.Random:
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _user_text(messages: list[dict]) -> str:
    users = [m.get("content") or "" for m in messages if m.get("role") == "user"]
    if not users or not isinstance(users[-1], str):
        raise UnrecognisedRequest("the request has no user message with text content")
    return users[-1]


def classify(messages: list[dict]) -> str:
    """'referee' or 'generator' for lion-ray's prompts of those roles, else 'teacher' (any
    instruction); raises UnrecognisedRequest for a request without user text."""
    user = _user_text(messages)
    if prompts.parse_referee_prompt(user) is not None:
        return "referee"
    if prompts.parse_generator_prompt(user) is not None:
        return "generator"
    if not user.strip():
        raise UnrecognisedRequest("the last user message is empty")
    return "teacher"


def _instruction_of(user: str) -> tuple[str, str]:
    """(instruction, input) of a teacher request: a plain message (the input after a blank
    line), or the instruction template lion-ray 0.1.0 sent."""
    split = prompts.split_prompt(user)
    if split is not None:
        return split
    instruction, _, input_text = user.strip().partition("\n\n")
    return instruction.strip(), input_text.strip()


def _generic_answer(instruction: str) -> str:
    """A stand-in answer for instructions outside the task families (e.g. Alpaca seeds)."""
    rng = _rng("generic", instruction)
    topic = " ".join(instruction.split()[:8])
    lines = [
        f'Here is a careful response to "{topic}".',
        "First, consider what the request asks for and the context it gives.",
        "Then work through it step by step, checking each part.",
        "Finally, summarise the answer clearly and concisely.",
    ]
    return " ".join(lines[: 2 + rng.randint(0, 2)])


def _corrupt(task: Task, rng: random.Random) -> str:
    family = FAMILY_BY_NAME[task.family]
    if family.kind == "number":
        return str(int(task.answer) + rng.choice([-3, -2, -1, 1, 2, 3]))
    chars = list(task.answer)
    if len(chars) > 1:
        i = rng.randrange(len(chars) - 1)
        chars[i], chars[i + 1] = chars[i + 1], chars[i]
    if "".join(chars) == task.answer:
        chars.append(rng.choice("xyz"))
    return "".join(chars)


def teacher_reply(messages: list[dict], seed: int | None, options: WorldOptions) -> str:
    instruction, input_text = _instruction_of(_user_text(messages))
    full = instruction + (f"\n\n{input_text}" if input_text else "")
    task = parse_instruction(instruction)
    if task is None:
        return _generic_answer(full)
    if (
        options.teacher_error_rate
        and _rng("teacher-error", full).random() < options.teacher_error_rate
    ):
        return _corrupt(task, _rng("corrupt", full))
    return task.answer


def _judge(task_text: str, answer: str) -> tuple[int, str]:
    """(score 1..10, a phrase explaining it) for one answer."""
    instruction = task_text.split("\n\n", 1)[0]
    task = parse_instruction(instruction)
    shown = normalize_answer(answer)[:60] or "(nothing)"
    if task is None:
        ratio = difflib.SequenceMatcher(a=answer.strip(), b=_generic_answer(task_text)).ratio()
        score = 10 if ratio > 0.999 else 1 + round(8 * ratio)
        return (
            score,
            f"answered '{shown}', {'complete and on topic' if score >= 8 else 'incomplete'}",
        )
    score = score_answer(task, answer)
    if score == 10:
        return score, f"answered '{shown}', which is correct"
    return score, f"answered '{shown}', but the correct answer is '{task.answer}'"


_SCORE_STYLES = (
    "Score of the Assistant {n}: {s}",
    "Score of the Assistant {n}: {s}/10",
    "**Score of the Assistant {n}:** {s}",
    "Score of the Assistant {n}: {s} out of 10",
    "Score of the Assistant {n}:  {s}.0",
)


def referee_reply(
    messages: list[dict], seed: int | None, options: WorldOptions, structured: bool = False
) -> str:
    user = _user_text(messages)
    task_text, answer_1, answer_2 = prompts.parse_referee_prompt(user)  # type: ignore[misc]
    s1, why1 = _judge(task_text, answer_1)
    s2, why2 = _judge(task_text, answer_2)
    rng = _rng("referee", user, seed)
    if structured:  # response_format with the referee's JSON schema
        review = json.dumps(
            {
                "explanation": f"Assistant 1 {why1}. Assistant 2 {why2}.",
                "score_assistant_1": s1,
                "score_assistant_2": s2,
            }
        )
        if options.malformed_rate and rng.random() < options.malformed_rate:
            return review[: len(review) // 2]  # cut off, as by a max_tokens limit
        return review
    if options.malformed_rate and rng.random() < options.malformed_rate:
        return rng.choice(
            [
                f"Assistant 1 {why1}. Assistant 2 {why2}. Both answers were considered.",
                f"Score of the Assistant 1: excellent\nScore of the Assistant 2: {s2}",
                f"Assistant 1 {why1}.\nScore of the Assistant 1: {s1}",
                f"Score of the Assistant 1: {s1 + 10}\nScore of the Assistant 2: {s2}",
            ]
        )
    style = _SCORE_STYLES[rng.randrange(len(_SCORE_STYLES))]
    tail = "\n" if rng.random() < 0.3 else ""
    return (
        f"Assistant 1 {why1}. Assistant 2 {why2}.\n\n"
        f"{style.format(n=1, s=s1)}\n{style.format(n=2, s=s2)}{tail}"
    )


def generator_reply(messages: list[dict], seed: int | None, options: WorldOptions) -> str:
    user = _user_text(messages)
    kind, given = prompts.parse_generator_prompt(user)  # type: ignore[misc]
    rng = _rng("generator", user, seed)
    task = parse_instruction(given.split("\n", 1)[0])
    if task is None:  # outside the families: pick one by the text, at the easiest level
        family, difficulty = FAMILIES[_rng("family", given).randrange(len(FAMILIES))], 1
    else:
        family, difficulty = FAMILY_BY_NAME[task.family], task.difficulty
    if kind == "hard":
        new_difficulty = min(5, difficulty + (1 if rng.random() < 0.5 else 0))
    else:
        candidates = rarer_families(family.name)
        family = candidates[rng.randrange(len(candidates))]
        new_difficulty = difficulty
    return make_task(family, rng, new_difficulty, like_an_llm=True).instruction


_REPLIES = {"teacher": teacher_reply, "referee": referee_reply, "generator": generator_reply}


def reply(
    messages: list[dict],
    seed: int | None = None,
    options: WorldOptions | None = None,
    response_format: dict | None = None,
) -> tuple[str, str]:
    """(call kind, assistant text) for a chat request."""
    kind = classify(messages)
    options = options or WorldOptions()
    if kind == "referee" and (response_format or {}).get("type") == "json_schema":
        return kind, referee_reply(messages, seed, options, structured=True)
    return kind, _REPLIES[kind](messages, seed, options)
