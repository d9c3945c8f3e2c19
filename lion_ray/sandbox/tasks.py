"""Task families whose answers a program can check, each with a difficulty knob (1..5).

Each family has three short phrasings, the seed pool's and the held-out set's (as a person
writes seed tasks), and the generator writes like an LLM: each new instruction in one of
at least eight surface forms of its family (other verbs, word orders, quoted or unquoted
payloads), half of them after a short context sentence. With three short forms only, the
ROUGE-L > 0.7 filter rejected most candidates of some families (one phrasing with new
numbers), so the filter, not the selection, decided what a round added (docs/method.md).
Every form, with or without its context sentence, parses back, which is how the sandbox
server answers, judges and extends instructions it did not write itself.

Family weights set how common a family is in the seed pool; "rarer" (for the generator's
easy rule) means a lower weight.
"""

from __future__ import annotations

import difflib
import random
import re
from collections.abc import Callable, Container
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
    phrasings: tuple[str, ...]  # the seed pool's and held-out set's forms
    make: Callable[[random.Random, int], dict]
    solve: Callable[[dict], str]
    difficulty_of: Callable[[dict], int]
    rephrasings: tuple[str, ...] = ()  # more forms the generator writes besides those
    patterns: tuple[re.Pattern, ...] = field(default=(), compare=False)

    @property
    def forms(self) -> tuple[str, ...]:
        return self.phrasings + self.rephrasings


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
        rephrasings=(
            "[Write|Give|List] the letters of '{w}' in reverse order.",
            "What is {w} spelled [backwards|in reverse|back to front]?",
            '[Please reverse|Reverse|Kindly reverse] the [string|word|text] "{w}".',
            "[Give me|Show me|Write out] the word {w} [written|read|spelled] from right to left.",
            "Can you [flip|turn around|mirror] '{w}' so that it reads backwards?",
        ),
    ),
    Family(
        "uppercase",
        3.0,
        "text",
        ("Uppercase '{w}'.", "All caps: '{w}'", "In uppercase: '{w}'"),
        lambda rng, d: {"w": _word(rng, d + 2)},
        lambda p: p["w"].upper(),
        lambda p: _clamp(len(p["w"]) - 2),
        rephrasings=(
            "[Convert|Change|Transform] {w} to [uppercase|upper case].",
            "[Write|Print|Type] '{w}' in capital letters.",
            '[Turn|Make] the word "{w}" into all [capitals|caps].',
            "[Rewrite|Spell|Render] {w} using only upper-case letters.",
            "What does '{w}' look like in [block capitals|all capitals|capital letters]?",
        ),
    ),
    Family(
        "add",
        3.0,
        "number",
        ("What is {a} + {b}?", "Add {a} and {b}.", "Sum {a} and {b}."),
        _make_add,
        lambda p: str(int(p["a"]) + int(p["b"])),
        lambda p: _bucket(max(int(p["a"]), int(p["b"])), _ADD_LIMITS),
        rephrasings=(
            "[Calculate|Compute|Work out|Find] the sum of {a} and {b}.",
            "If you add {b} to {a}, what [do you get|is the result|is the total]?",
            "[Compute|Calculate|Evaluate] {a} plus {b}.",
            "What do {a} and {b} [add up to|sum to|come to together]?",
            "[Find|Give|Tell me] the total of {a} and {b}.",
        ),
    ),
    Family(
        "max",
        2.0,
        "number",
        ("Largest of {lst}?", "Max of {lst}?", "Which is biggest: {lst}?"),
        _make_max,
        lambda p: str(max(_ints(p["lst"]))),
        lambda p: _clamp(len(_ints(p["lst"])) - 2),
        rephrasings=(
            "Which number is the [largest|biggest|greatest] in this list: {lst}?",
            "[Find|Give|Identify] the maximum of {lst}.",
            "Out of {lst}, which [is the greatest|is the largest|is highest]?",
            "[Pick|Choose|Select] the biggest value from {lst}.",
            "What is the [highest|largest|top] number among {lst}?",
        ),
    ),
    Family(
        "sort_letters",
        2.0,
        "text",
        ("Alphabetize '{w}'.", "Sort '{w}' alphabetically.", "Sort letters: '{w}'"),
        lambda rng, d: {"w": _word(rng, d + 2)},
        lambda p: "".join(sorted(p["w"])),
        lambda p: _clamp(len(p["w"]) - 2),
        rephrasings=(
            "[Put|Arrange|Place] the letters of '{w}' in alphabetical order.",
            "[Rearrange|Reorder|Shuffle] {w} so that its letters go from a to z.",
            '[Sort|Order] the characters of "{w}" [alphabetically|by the alphabet].',
            "[Write|List|Give] the letters in {w} in a-to-z order.",
            "[Order|Sort] the letters of '{w}' alphabetically, please.",
        ),
    ),
    Family(
        "count_char",
        2.0,
        "number",
        ("Count '{c}' in '{w}'.", "How many '{c}' in '{w}'?", "Occurrences of '{c}' in '{w}'?"),
        _make_count,
        lambda p: str(p["w"].count(p["c"])),
        lambda p: _clamp(len(p["w"]) - 3),
        rephrasings=(
            "How many times does the letter '{c}' [appear|occur|show up] in '{w}'?",
            "[Count|Tally|Find] the occurrences of {c} in the word {w}.",
            "In \"{w}\", how [often|many times] does '{c}' occur?",
            "[Tell me|Say|Work out] how many {c}'s there are in {w}.",
            "[Find|Give|Report] the number of '{c}' characters in '{w}'.",
        ),
    ),
    Family(
        "next_term",
        2.0,
        "number",
        ("What comes next: {lst}?", "Continue {lst}.", "Next number after {lst}?"),
        _make_seq,
        _seq_next,
        _seq_difficulty,
        rephrasings=(
            "What is the next number in the [sequence|series|progression] {lst}?",
            "[Find|Give|Name] the term that follows {lst}.",
            "[Continue|Extend] the pattern {lst} with one more number.",
            "Given the [sequence|series|list] {lst}, what comes after the last term?",
            "Which number should [come|go] next in {lst}?",
        ),
    ),
    Family(
        "word_length",
        1.0,
        "number",
        ("Length of '{w}'?", "Count letters: '{w}'", "Letters in '{w}'?"),
        lambda rng, d: {"w": _word(rng, 2 + 2 * d + rng.randint(0, 1))},
        lambda p: str(len(p["w"])),
        lambda p: _clamp((len(p["w"]) - 2) // 2),
        rephrasings=(
            "How many letters does '{w}' [have|contain]?",
            "[Count|Tally] the characters in the word {w}.",
            'What is the length of "{w}" in [letters|characters]?',
            "[Tell me|Say|Work out] how long the word {w} is.",
            "How many characters are [in|there in] '{w}'?",
        ),
    ),
    Family(
        "multiply",
        1.0,
        "number",
        ("What is {a} times {b}?", "Multiply {a} by {b}.", "Product of {a} and {b}?"),
        _make_mul,
        lambda p: str(int(p["a"]) * int(p["b"])),
        lambda p: _bucket(int(p["a"]), _MUL_LIMITS),
        rephrasings=(
            "[Calculate|Compute|Work out] {a} multiplied by {b}.",
            "What do you get when you multiply {a} by {b}?",
            "[Compute|Find|Give] the product of {a} and {b}.",
            "[Find|Evaluate|Calculate] {a} x {b}.",
            "What is {a} times {b} [equal to|in total]?",
        ),
    ),
    Family(
        "caesar",
        1.0,
        "text",
        ("Shift '{w}' by {k}.", "Caesar-shift '{w}' by {k}.", "Rotate '{w}' by {k}."),
        lambda rng, d: {"w": _word(rng, d + 2), "k": rng.randint(1, 1 + 2 * d)},
        lambda p: _caesar(p["w"], int(p["k"])),
        lambda p: _clamp(max(len(p["w"]) - 2, int(p["k"]) // 2)),
        rephrasings=(
            "Apply a Caesar shift of {k} to '{w}'.",
            "[Shift|Move|Advance] each letter of {w} forward by {k}.",
            '[Encode|Encrypt|Cipher] "{w}" with a Caesar cipher of shift {k}.',
            "Move every letter in '{w}' {k} places [along|down|forward in] the alphabet.",
            "[Rotate|Shift] the letters of {w} by {k} positions.",
        ),
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
    """A form's regex: ``{field}`` is its payload, ``[a|b|c]`` one of the words an LLM may
    choose there."""
    parts = re.split(r"(\{\w+\}|\[[^\]]+\])", phrasing)
    regex = "".join(
        _FIELD_PATTERNS[p[1:-1]]
        if p.startswith("{")
        else "(?:" + "|".join(re.escape(o) for o in p[1:-1].split("|")) + ")"
        if p.startswith("[")
        else re.escape(p)
        for p in parts
    )
    return re.compile(rf"^{regex}$")


def _choose_words(form: str, rng: random.Random) -> str:
    """``form`` with each ``[a|b|c]`` replaced by one of its words (no draw when it has none,
    so the seed phrasings' draws are what they always were)."""
    return re.sub(r"\[([^\]]+)\]", lambda m: rng.choice(m.group(1).split("|")), form)


FAMILIES = tuple(
    Family(**{**f.__dict__, "patterns": tuple(_compile(p) for p in f.forms)}) for f in FAMILIES
)
# A sentence an LLM generator may put before the task, and a request about the answer's
# form it may put after it (``[a|b]``: one of the words); the server reads past both.
CONTEXTS = (
    "[Here is|This is] a small [task|exercise]. ",
    "I am [practising|studying|preparing] for a [quiz|test]. ",
    "[Quick|Simple|Easy] question: ",
    "This is for a [worksheet|homework sheet|class handout]. ",
    "[Help me|Please help me] check my [answer|work]. ",
    "[Try|Solve|Do] this one. ",
)
CLOSINGS = (
    " [Answer|Reply|Respond] with just the result.",
    " [Give|Write|State] only the final answer.",
    " Keep the answer [short|brief].",
    " No [explanation|working] is needed.",
    " Just the answer, [please|thanks].",
)
CONTEXT_PATTERNS = tuple(re.compile("^" + _compile(c).pattern[1:-1]) for c in CONTEXTS)
CLOSING_PATTERNS = tuple(re.compile(_compile(c).pattern[1:-1] + "$") for c in CLOSINGS)
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
    family: Family,
    rng: random.Random,
    difficulty: int,
    phrasing: int | None = None,
    like_an_llm: bool = False,
) -> Task:
    """A task of ``family``: in one of its seed phrasings, or ``like_an_llm`` (the
    generator) in any of its forms, half of the time after a context sentence.
    ``phrasing`` picks a form by its index in ``family.forms``."""
    params = family.make(rng, _clamp(difficulty))
    forms = family.forms if like_an_llm or phrasing is not None else family.phrasings
    idx = rng.randrange(len(forms)) if phrasing is None else phrasing
    text = _choose_words(forms[idx], rng).format(**params)
    if like_an_llm and rng.random() < 0.3:
        text = _choose_words(CONTEXTS[rng.randrange(len(CONTEXTS))], rng) + text
    if like_an_llm and rng.random() < 0.3:
        text += _choose_words(CLOSINGS[rng.randrange(len(CLOSINGS))], rng)
    return Task(family.name, family.difficulty_of(params), text, family.solve(params), params)


def parse_instruction(text: str) -> Task | None:
    """The task an instruction asks for, if it is in one of the sandbox's forms (after a
    context sentence or not)."""
    text = text.strip()
    for context in CONTEXT_PATTERNS:
        text = context.sub("", text, count=1)
    for closing in CLOSING_PATTERNS:
        text = closing.sub("", text, count=1)
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
    per_cell: int, seed: int = 0, max_difficulty: int = 5, exclude: Container[str] | None = None
) -> list[Task]:
    """``per_cell`` distinct tasks for every family at every difficulty 1..max_difficulty
    (the whole distribution hard mining can reach, in equal parts), none in ``exclude`` (any
    container: a large pool's is a set of hashes)."""
    rng = random.Random(seed)
    exclude = exclude if exclude is not None else ()
    seen: set[str] = set()
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
                fresh = task.instruction not in seen and task.instruction not in exclude
                if task.difficulty == difficulty and fresh:
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
