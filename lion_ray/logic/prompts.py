"""Every prompt lion-ray sends or trains on, in one place.

* The student template (training and inference use the same text; loss covers only what
  follows the response marker, plus EOS).
* The teacher call: a system message and the instruction as a plain user message.
* The referee call: instruction, two fenced answers, the rubric, and a required output
  format ending in two ``Score of the Assistant N: <score>`` lines.
* The generator call: "act as an instruction writer", the hard or easy rule, the given
  instruction, then a marker after which the new instruction is written.

The sandbox server recognises the three calls by the markers defined here, so changing a
marker here changes both sides at once.
"""

from __future__ import annotations

from typing import Literal

TemplateName = Literal["alpaca", "compact"]

INSTRUCTION_MARKER = "### Instruction:\n"
INPUT_MARKER = "### Input:\n"
RESPONSE_MARKER = "### Response:\n"

_PREAMBLE = {
    "alpaca": (
        "The following is an instruction that describes a task{extra}. "
        "Write a response that correctly completes it.\n\n"
    ),
    "compact": "",
}
_PREAMBLE_WITH_INPUT = ", paired with an input that gives further context"


def build_prompt(instruction: str, input_text: str = "", template: TemplateName = "alpaca") -> str:
    """The student's prompt: everything before the answer."""
    if template not in _PREAMBLE:
        raise ValueError(f"unknown prompt template {template!r}; use one of {sorted(_PREAMBLE)}")
    preamble = _PREAMBLE[template].format(extra=_PREAMBLE_WITH_INPUT if input_text else "")
    body = f"{INSTRUCTION_MARKER}{instruction.strip()}\n\n"
    if input_text:
        body += f"{INPUT_MARKER}{input_text.strip()}\n\n"
    return f"{preamble}{body}{RESPONSE_MARKER}"


def split_prompt(prompt: str) -> tuple[str, str] | None:
    """Inverse of :func:`build_prompt`: (instruction, input), or None if it is not one."""
    start = prompt.find(INSTRUCTION_MARKER)
    end = prompt.rfind(RESPONSE_MARKER)
    if start < 0 or end < start:
        return None
    body = prompt[start + len(INSTRUCTION_MARKER) : end].strip("\n")
    instruction, sep, input_text = body.partition(f"\n\n{INPUT_MARKER}")
    return instruction.strip(), input_text.strip() if sep else ""


# --- teacher -------------------------------------------------------------------------------

TEACHER_SYSTEM = (
    "You are a helpful assistant. Give a helpful, accurate and complete response to the "
    "user's request."
)


def teacher_messages(instruction: str, input_text: str = "") -> list[dict]:
    """The teacher gets the instruction (and its input) as a plain chat message: whatever
    format the student uses, the same request, so one cached answer serves any student."""
    user = instruction.strip() + (f"\n\n{input_text.strip()}" if input_text else "")
    return [
        {"role": "system", "content": TEACHER_SYSTEM},
        {"role": "user", "content": user},
    ]


# --- referee -------------------------------------------------------------------------------

REFEREE_SYSTEM = "You are a careful and impartial judge of how well AI assistants answer."
REFEREE_ANSWER_START = "[The Start of Assistant {n}'s Answer]"
REFEREE_ANSWER_END = "[The End of Assistant {n}'s Answer]"
REFEREE_INSTRUCTION_HEADER = "[Instruction]"
REFEREE_RUBRIC_HEADER = "[Evaluation]"
REFEREE_RUBRIC = (
    "Two AI assistants answered the instruction above. Judge each answer on its helpfulness, "
    "relevance, accuracy and level of detail, and give each an overall score from 1 to 10, "
    "where a higher score means a better answer. The order in which the answers are shown "
    "must not influence your judgement.\n"
    "First write a short explanation of your judgement. Then end your reply with exactly "
    "these two lines, in this order:\n"
    "Score of the Assistant 1: <score>\n"
    "Score of the Assistant 2: <score>"
)


# Structured output (referee.structured_output): the endpoint is asked for this JSON schema;
# the text score lines stay in the prompt, so a provider that ignores it still answers.
REFEREE_RESPONSE_FORMAT = {
    "type": "json_schema",
    "json_schema": {
        "name": "referee_scores",
        "strict": True,
        "schema": {
            "type": "object",
            "properties": {
                "explanation": {"type": "string"},
                "score_assistant_1": {"type": "number", "minimum": 1, "maximum": 10},
                "score_assistant_2": {"type": "number", "minimum": 1, "maximum": 10},
            },
            "required": ["explanation", "score_assistant_1", "score_assistant_2"],
            "additionalProperties": False,
        },
    },
}


def referee_messages(instruction: str, input_text: str, answer_1: str, answer_2: str) -> list[dict]:
    task = instruction.strip() + (f"\n\n{input_text.strip()}" if input_text else "")
    content = (
        f"{REFEREE_INSTRUCTION_HEADER}\n{task}\n\n"
        f"{REFEREE_ANSWER_START.format(n=1)}\n{answer_1}\n{REFEREE_ANSWER_END.format(n=1)}\n\n"
        f"{REFEREE_ANSWER_START.format(n=2)}\n{answer_2}\n{REFEREE_ANSWER_END.format(n=2)}\n\n"
        f"{REFEREE_RUBRIC_HEADER}\n{REFEREE_RUBRIC}"
    )
    return [{"role": "system", "content": REFEREE_SYSTEM}, {"role": "user", "content": content}]


def parse_referee_prompt(content: str) -> tuple[str, str, str] | None:
    """(task, answer_1, answer_2) from a referee user message, or None if it is not one."""
    try:
        head, rest = content.split(REFEREE_ANSWER_START.format(n=1) + "\n", 1)
        answer_1, rest = rest.split("\n" + REFEREE_ANSWER_END.format(n=1), 1)
        _, rest = rest.split(REFEREE_ANSWER_START.format(n=2) + "\n", 1)
        answer_2, rest = rest.split("\n" + REFEREE_ANSWER_END.format(n=2), 1)
    except ValueError:
        return None
    if not head.startswith(REFEREE_INSTRUCTION_HEADER) or REFEREE_RUBRIC_HEADER not in rest:
        return None
    return head[len(REFEREE_INSTRUCTION_HEADER) :].strip(), answer_1, answer_2


# --- generator -----------------------------------------------------------------------------

GENERATOR_SYSTEM = "You write new, self-contained task instructions for training assistants."
GIVEN_MARKER = "#Given Instruction#:"
NEW_MARKER = "#New Instruction#:"
HARD_RULE = (
    "The new instruction must belong to the same domain and be the same type of task as the "
    "#Given Instruction#, with a similar length and difficulty."
)
EASY_RULE = (
    "The new instruction must belong to the same domain as the #Given Instruction# but ask "
    "for something less common: a rarer topic or a rarer kind of task. Keep its length and "
    "difficulty similar."
)
_GENERATOR_TEMPLATE = (
    "Act as an instruction creator. Take inspiration from the #Given Instruction# below and "
    "write one brand-new instruction.\n"
    "{rule}\n"
    "The new instruction must make sense to a person and be answerable. Write only the new "
    "instruction, and do not mention the given instruction or these markers.\n"
    f"{GIVEN_MARKER}\n{{given}}\n{NEW_MARKER}\n"
)


def generator_messages(
    kind: Literal["hard", "easy"], instruction: str, input_text: str = ""
) -> list[dict]:
    if kind not in ("hard", "easy"):
        raise ValueError(f"generator kind must be 'hard' or 'easy', got {kind!r}")
    given = instruction.strip() + (f"\n{input_text.strip()}" if input_text else "")
    rule = HARD_RULE if kind == "hard" else EASY_RULE
    content = _GENERATOR_TEMPLATE.format(rule=rule, given=given)
    return [{"role": "system", "content": GENERATOR_SYSTEM}, {"role": "user", "content": content}]


def parse_generator_prompt(content: str) -> tuple[str, str] | None:
    """(kind, given instruction) from a generator user message, or None if it is not one."""
    if GIVEN_MARKER not in content or NEW_MARKER not in content:
        return None
    kind = "hard" if HARD_RULE in content else "easy" if EASY_RULE in content else None
    if kind is None:
        return None
    given = content.split(GIVEN_MARKER + "\n", 1)[1].rsplit("\n" + NEW_MARKER, 1)[0]
    return kind, given.strip()


def clean_generated_instruction(text: str) -> str:
    """The instruction part of a generator reply (drops an echoed marker or quotes)."""
    text = text.strip()
    if NEW_MARKER in text:
        text = text.split(NEW_MARKER, 1)[1].strip()
    return text
