"""Training examples: the prompt template, loss masking, truncation and packing.

Pure functions over token ids (the tokenizer is passed in as a function), so the exact
rules are tested without torch:

* the loss covers only the response tokens plus EOS (prompt labels are -100);
* truncation never leaves an example without a target token;
* packing concatenates short examples into one sequence; position ids restart at every
  example, which is what makes attention stay inside each example (transformers builds a
  block-diagonal causal mask from them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

IGNORE = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    @property
    def target_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


def fit_example(prompt: list[int], target: list[int], max_length: int) -> Encoded:
    """Prompt ids + target ids (the answer and its end token), labels masked on the prompt,
    fitted into ``max_length``.

    When too long, the target is cut to leave the prompt at least half the window (or all
    of it, if shorter), then the prompt loses tokens from its start (its end holds the
    response marker the model must see). At least one target token always remains.
    """
    if max_length < 2:
        raise ValueError("max_length must be at least 2 (one prompt and one target token)")
    if not target:
        raise ValueError("an example needs at least one target token")
    p, a = list(prompt), list(target)
    truncated = False
    if len(p) + len(a) > max_length:
        truncated = True
        keep_prompt = min(len(p), max(1, max_length // 2))
        a = a[: max(1, max_length - keep_prompt)]
        p = p[len(p) - (max_length - len(a)) :] if max_length - len(a) > 0 else p[-1:]
    return Encoded(p + a, [IGNORE] * len(p) + a, truncated)


def encode_example(
    tokenize: Callable[[str], list[int]], prompt: str, answer: str, eos_id: int, max_length: int
) -> Encoded:
    """A text prompt and answer, the answer followed by EOS (see :func:`fit_example`)."""
    return fit_example(tokenize(prompt), tokenize(answer) + [eos_id], max_length)


@dataclass
class Sequence:
    """One training row: possibly several examples packed together."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


def pack(examples: list[Encoded], max_length: int) -> list[Sequence]:
    """Greedy packing in order: an example goes into the current sequence if it fits."""
    out: list[Sequence] = []
    cur = Sequence([], [], [])
    for ex in examples:
        if cur.input_ids and len(cur) + len(ex.input_ids) > max_length:
            out.append(cur)
            cur = Sequence([], [], [])
        cur.input_ids += ex.input_ids
        cur.labels += ex.labels
        cur.position_ids += list(range(len(ex.input_ids)))
    if cur.input_ids:
        out.append(cur)
    return out


def unpacked(examples: list[Encoded]) -> list[Sequence]:
    return [Sequence(e.input_ids, e.labels, list(range(len(e.input_ids)))) for e in examples]


class EpochOrder:
    """The order a worker visits its sequences in: one seeded permutation per epoch, built
    once when the epoch starts (building it for every micro-batch made an epoch cost
    sequences squared over the micro-batch size)."""

    def __init__(self, count: int, seed: int):
        self.count, self.seed = count, seed
        self.epoch: int | None = None
        self.order: list[int] = []
        self.built = 0  # permutations built so far: one per epoch visited

    def __call__(self, epoch: int) -> list[int]:
        if epoch != self.epoch:
            import random

            self.order = list(range(self.count))
            random.Random(self.seed * 7919 + epoch).shuffle(self.order)
            self.epoch = epoch
            self.built += 1
        return self.order


def pad_batch(
    seqs: list[Sequence], pad_id: int, pad_to: int | None = None
) -> dict[str, list[list[int]]]:
    """Right-padded ids, labels (-100 on padding), position ids and an attention mask."""
    width = pad_to or max(len(s) for s in seqs)
    batch: dict[str, list[list[int]]] = {
        "input_ids": [],
        "labels": [],
        "position_ids": [],
        "attention_mask": [],
    }
    for s in seqs:
        gap = width - len(s)
        batch["input_ids"].append(s.input_ids + [pad_id] * gap)
        batch["labels"].append(s.labels + [IGNORE] * gap)
        # padding continues the last position so it never looks like the start of an example
        last = s.position_ids[-1] if s.position_ids else -1
        batch["position_ids"].append(s.position_ids + list(range(last + 1, last + 1 + gap)))
        batch["attention_mask"].append([1] * len(s) + [0] * gap)
    return batch
