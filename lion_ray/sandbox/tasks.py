"""Task families whose answers a program can check, each with a difficulty knob (1..5).

Each family has several short phrasings. They are short on purpose: two instructions of
one phrasing share only its few words, so new instructions pass the ROUGE-L > 0.7 filter
when their payload (word, numbers) differs. Every phrasing can be parsed back, which is
how the sandbox server answers, judges and extends instructions it did not write itself.

Family weights set how common a family is in the seed pool; "rarer" (for the generator's
easy rule) means a lower weight.
"""

from __future__ import annotations

import difflib
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field

_CONSONANTS = "bcdfghjklmnprstvwz"
_VOWELS = "aeiou"


def _word(rng: random.Random, length: int) -> str:
    """A pronounceable nonsense word, so tasks cannot be answered from memory."""
    letters = []
    for i in range(length):
        pool = _CONSONANTS if (i % 2 == 0) != (rng.random() < 0.2) else _VOWELS
        letters.append(rng.choice(pool))
    return "".join(letters)


def _caesar(word: str, k: int) -> str:
    return "".join(chr((ord(c) - 97 + k) % 26 + 97) for c in word)


@dataclass(frozen=True)
class Family:
    name: str
    weight: float
    kind: str  # "text" or "number": how answers are compared
    phrasings: tuple[str, ...]
    make: Callable[[random.Random, int], dict]
    solve: Callable[[dict], str]
    difficulty_of: Callable[[dict], int]
    patterns: tuple[re.Pattern, ...] = field(default=(), compare=False)


def _clamp(d: int) -> int:
    return max(1, min(5, d))


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(", ")]


_ADD_LIMITS = (9, 19, 49, 99, 499)  # largest operand at difficulty 1..5
_MUL_LIMITS = (5, 9, 12, 20, 40)


def _bucket(value: int, limits: tuple[int, ...]) -> int:
    """The lowest difficulty whose limit admits ``value``."""
    return next((d for d, hi in enumerate(limits, start=1) if value <= hi), len(limits))


def _in_bucket(rng: random.Random, d: int, limits: tuple[int, ...], low: int) -> int:
    """A value whose bucket is exactly ``d``."""
    return rng.randint(limits[d - 2] + 1 if d > 1 else low, limits[d - 1])


def _make_add(rng: random.Random, d: int) -> dict:
    a, b = _in_bucket(rng, d, _ADD_LIMITS, 1), rng.randint(1, _ADD_LIMITS[d - 1])
    return {"a": a, "b": b} if rng.random() < 0.5 else {"a": b, "b": a}


def _make_mul(rng: random.Random, d: int) -> dict:
    return {
        "a": _in_bucket(rng, d, _MUL_LIMITS, 2),
        "b": rng.randint(2, 9 if d < 4 else _MUL_LIMITS[d - 1]),
    }


def _make_count(rng: random.Random, d: int) -> dict:
    c = rng.choice(_VOWELS + "rstln")
    w = list(_word(rng, d + 3))
    for _ in range(rng.randint(0, 2)):
        w[rng.randrange(len(w))] = c
    return {"c": c, "w": "".join(w)}


def _make_seq(rng: random.Random, d: int) -> dict:
    step = rng.choice([2 * d - 1, 2 * d]) * (1 if d < 4 or rng.random() < 0.5 else -1)
    start = rng.randint(0, 10 * d)
    return {"lst": ", ".join(str(start + i * step) for i in range(4))}


def _make_max(rng: random.Random, d: int) -> dict:
    hi = [9, 30, 99, 99, 999][d - 1]
    values = rng.sample(range(0, hi + 1), k=min(hi + 1, d + 2))
    return {"lst": ", ".join(str(v) for v in values)}


def _seq_next(p: dict) -> str:
    v = _ints(p["lst"])
    return str(v[-1] + (v[-1] - v[-2]))


def _seq_difficulty(p: dict) -> int:
    v = _ints(p["lst"])
    return _clamp((abs(v[1] - v[0]) + 1) // 2)


FAMILIES: tuple[Family, ...] = (
    Family(
        "reverse",
        3.0,
        "text",
        ("Reverse '{w}'.", "Spell '{w}' backwards.", "Write '{w}' reversed."),
        lambda rng, d: {"w": _word(rng, d + 2)},
        lambda p: p["w"][::-1],
        lambda p: _clamp(len(p["w"]) - 2),
    ),
    Family(
        "uppercase",
        3.0,
        "text",
        ("Uppercase '{w}'.", "All caps: '{w}'", "In uppercase: '{w}'"),
        lambda rng, d: {"w": _word(rng, d + 2)},
        lambda p: p["w"].upper(),
        lambda p: _clamp(len(p["w"]) - 2),
    ),
    Family(
        "add",
        3.0,
        "number",
        ("What is {a} + {b}?", "Add {a} and {b}.", "Sum {a} and {b}."),
        _make_add,
        lambda p: str(int(p["a"]) + int(p["b"])),
        lambda p: _bucket(max(int(p["a"]), int(p["b"])), _ADD_LIMITS),
    ),
    Family(
        "max",
        2.0,
        "number",
        ("Largest of {lst}?", "Max of {lst}?", "Which is biggest: {lst}?"),
        _make_max,
        lambda p: str(max(_ints(p["lst"]))),
        lambda p: _clamp(len(_ints(p["lst"])) - 2),
    ),
    Family(
        "sort_letters",
        2.0,
        "text",
        ("Alphabetize '{w}'.", "Sort '{w}' alphabetically.", "Sort letters: '{w}'"),
        lambda rng, d: {"w": _word(rng, d + 2)},
        lambda p: "".join(sorted(p["w"])),
        lambda p: _clamp(len(p["w"]) - 2),
    ),
    Family(
        "count_char",
        2.0,
        "number",
        ("Count '{c}' in '{w}'.", "How many '{c}' in '{w}'?", "Occurrences of '{c}' in '{w}'?"),
        _make_count,
        lambda p: str(p["w"].count(p["c"])),
        lambda p: _clamp(len(p["w"]) - 3),
    ),
    Family(
        "next_term",
        2.0,
        "number",
        ("What comes next: {lst}?", "Continue {lst}.", "Next number after {lst}?"),
        _make_seq,
        _seq_next,
        _seq_difficulty,
    ),
    Family(
        "word_length",
        1.0,
        "number",
        ("Length of '{w}'?", "Count letters: '{w}'", "Letters in '{w}'?"),
        lambda rng, d: {"w": _word(rng, 2 + 2 * d + rng.randint(0, 1))},
        lambda p: str(len(p["w"])),
        lambda p: _clamp((len(p["w"]) - 2) // 2),
    ),
    Family(
        "multiply",
        1.0,
        "number",
        ("What is {a} times {b}?", "Multiply {a} by {b}.", "Product of {a} and {b}?"),
        _make_mul,
        lambda p: str(int(p["a"]) * int(p["b"])),
        lambda p: _bucket(int(p["a"]), _MUL_LIMITS),
    ),
    Family(
        "caesar",
        1.0,
        "text",
        ("Shift '{w}' by {k}.", "Caesar-shift '{w}' by {k}.", "Rotate '{w}' by {k}."),
        lambda rng, d: {"w": _word(rng, d + 2), "k": rng.randint(1, 1 + 2 * d)},
        lambda p: _caesar(p["w"], int(p["k"])),
        lambda p: _clamp(max(len(p["w"]) - 2, int(p["k"]) // 2)),
    ),
)

_FIELD_PATTERNS = {
    "w": r"(?P<w>[a-z]+)",
    "c": r"(?P<c>[a-z])",
    "a": r"(?P<a>-?\d+)",
    "b": r"(?P<b>-?\d+)",
    "k": r"(?P<k>\d+)",
    "lst": r"(?P<lst>-?\d+(?:, -?\d+)+)",
}


def _compile(phrasing: str) -> re.Pattern:
    parts = re.split(r"(\{\w+\})", phrasing)
    regex = "".join(_FIELD_PATTERNS[p[1:-1]] if p.startswith("{") else re.escape(p) for p in parts)
    return re.compile(rf"^{regex}$")


FAMILIES = tuple(
    Family(**{**f.__dict__, "patterns": tuple(_compile(p) for p in f.phrasings)}) for f in FAMILIES
)
FAMILY_BY_NAME = {f.name: f for f in FAMILIES}


@dataclass(frozen=True)
class Task:
    family: str
    difficulty: int
    instruction: str
    answer: str
    params: dict = field(compare=False, hash=False)

    def as_record(self) -> dict:
        return {
            "instruction": self.instruction,
            "input": "",
            "output": self.answer,
            "family": self.family,
            "difficulty": self.difficulty,
        }


def make_task(
    family: Family, rng: random.Random, difficulty: int, phrasing: int | None = None
) -> Task:
    params = family.make(rng, _clamp(difficulty))
    idx = rng.randrange(len(family.phrasings)) if phrasing is None else phrasing
    text = family.phrasings[idx].format(**params)
    return Task(family.name, family.difficulty_of(params), text, family.solve(params), params)


def parse_instruction(text: str) -> Task | None:
    """The task an instruction asks for, if it is one of the sandbox's phrasings."""
    text = text.strip()
    for family in FAMILIES:
        for pattern in family.patterns:
            m = pattern.match(text)
            if m:
                params = m.groupdict()
                return Task(
                    family.name, family.difficulty_of(params), text, family.solve(params), params
                )
    return None


def generate_tasks(
    n: int,
    seed: int = 0,
    max_difficulty: int = 5,
    min_difficulty: int = 1,
    families: list[str] | None = None,
) -> list[Task]:
    """``n`` distinct tasks, deterministic in ``seed``, families drawn by weight."""
    rng = random.Random(seed)
    chosen = [FAMILY_BY_NAME[f] for f in families] if families else list(FAMILIES)
    weights = [f.weight for f in chosen]
    tasks: dict[str, Task] = {}
    attempts = 0
    while len(tasks) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise ValueError(f"could not make {n} distinct tasks; raise max_difficulty or lower n")
        family = rng.choices(chosen, weights)[0]
        task = make_task(family, rng, rng.randint(min_difficulty, max_difficulty))
        tasks.setdefault(task.instruction, task)
    return list(tasks.values())


def stratified_tasks(
    per_cell: int, seed: int = 0, max_difficulty: int = 5, exclude: set[str] | None = None
) -> list[Task]:
    """``per_cell`` distinct tasks for every family at every difficulty 1..max_difficulty
    (the whole distribution hard mining can reach, in equal parts), none in ``exclude``."""
    rng = random.Random(seed)
    seen = set(exclude or ())
    out: list[Task] = []
    for family in FAMILIES:
        for difficulty in range(1, max_difficulty + 1):
            made, attempts = 0, 0
            while made < per_cell:
                attempts += 1
                if attempts > 200 * per_cell:
                    raise ValueError(
                        f"could not make {per_cell} distinct {family.name} tasks at "
                        f"difficulty {difficulty}"
                    )
                task = make_task(family, rng, difficulty)
                if task.difficulty == difficulty and task.instruction not in seen:
                    seen.add(task.instruction)
                    out.append(task)
                    made += 1
    return out


def normalize_answer(text: str) -> str:
    """An answer stripped of what does not change its meaning (space, quotes, final period)."""
    text = text.strip().splitlines()[0].strip() if text.strip() else ""
    return text.strip(" \t'\"`").rstrip(".").strip(" '\"`")


def is_correct(task: Task, answer: str) -> bool:
    return normalize_answer(answer) == task.answer


def score_answer(task: Task, answer: str) -> int:
    """1..10: 10 for the exact answer, partial credit for near misses, 1 for nothing."""
    got = normalize_answer(answer)
    if got == task.answer:
        return 10
    if not got:
        return 1
    family = FAMILY_BY_NAME[task.family]
    if family.kind == "number":
        try:
            value = float(got.replace(",", ""))
        except ValueError:
            return 2
        target = float(task.answer)
        closeness = max(0.0, 1.0 - abs(value - target) / max(1.0, abs(target)))
        return 2 + round(5 * closeness)
    ratio = difflib.SequenceMatcher(a=got, b=task.answer, autojunk=False).ratio()
    if got.lower() == task.answer.lower():
        ratio = max(ratio, 0.9)
    return 2 + round(6 * ratio)


def rarer_families(name: str) -> list[Family]:
    """Families rarer than ``name`` (lower weight); the rarest others when there are none."""
    weight = FAMILY_BY_NAME[name].weight
    rarer = [f for f in FAMILIES if f.weight < weight]
    if rarer:
        return rarer
    lowest = min(f.weight for f in FAMILIES if f.name != name)
    return [f for f in FAMILIES if f.name != name and f.weight == lowest]


def heldout_accuracy(tasks: list[dict], answers: dict[str, str]) -> dict:
    """Exact-answer accuracy on held-out records (instruction, output, family, difficulty),
    overall, per family and per difficulty; ``answers`` maps instruction to the student's
    answer."""
    per: dict[str, list[int]] = {}
    by_difficulty: dict[str, list[int]] = {}
    for rec in tasks:
        task = parse_instruction(rec["instruction"])
        got = answers.get(rec["instruction"], "")
        ok = task is not None and is_correct(task, got)
        per.setdefault(rec["family"], []).append(int(ok))
        by_difficulty.setdefault(str(rec.get("difficulty", "?")), []).append(int(ok))
    total = [x for xs in per.values() for x in xs]
    return {
        "accuracy": round(sum(total) / len(total), 4) if total else 0.0,
        "n": len(total),
        "by_family": {f: round(sum(xs) / len(xs), 4) for f, xs in sorted(per.items())},
        "by_difficulty": {
            d: round(sum(xs) / len(xs), 4) for d, xs in sorted(by_difficulty.items())
        },
    }
