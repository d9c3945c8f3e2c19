"""ROUGE-L dedup that makes exactly rouge-score's decisions, fast.

The method drops a new instruction when its ROUGE-L F-measure against any Cache Pool
instruction, or any candidate accepted before it, is above a threshold (0.7): rouge-score's
tokenizer, no stemming. The original compared each candidate with the whole pool through a
fresh process pool, quadratic and slow. Here:

1. every text is tokenized once with rouge-score's own tokenizer, tokens become ints;
2. an inverted index gives, for a candidate, its multiset token overlap with every pool
   instruction in one vectorised pass. The LCS can never exceed the overlap, so
   F(overlap) is an upper bound; pairs whose bound is not above the threshold cannot
   exceed it and are skipped (exact pruning: it cannot change a decision);
3. the few pairs left get an exact LCS (bit-parallel, Hyyrö 2004) and the F-measure is
   computed with rouge-score's own formula and operand order, so a score on the threshold
   rounds exactly as rouge-score rounds it.

``naive_decisions`` is the straightforward rouge-score loop over all pairs, kept as the
reference the fast path is tested and benchmarked against.

``similarity="same_payload"`` stops near-copies but keeps instructions that share a
template and differ in what they ask: a candidate is rejected only for a text above the
ROUGE-L threshold *with the same payload*, the payload being its numbers and its rare words
(in at most 1% of the Cache Pool's texts, or in none: the word to reverse, the topic of a
poem), while its template words are common. "Add 3 and 4." and "Add 3 and 5." ask different
things and are both kept; "Add 3 and 4, please." is a copy of the first. The same index and
exact LCS serve both rules; the payload only filters the texts a candidate is compared with.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from rouge_score import rouge_scorer, scoring, tokenizers

_TOKENIZER = tokenizers.DefaultTokenizer(use_stemmer=False)


def rouge_tokens(text: str) -> list[str]:
    """rouge-score's tokens for ``text`` (lowercase alphanumeric runs, no stemming)."""
    return _TOKENIZER.tokenize(text)


def lcs_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common subsequence, bit-parallel over ``a``."""
    if not a or not b:
        return 0
    masks: dict[int, int] = {}
    for i, t in enumerate(a):
        masks[t] = masks.get(t, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for t in b:
        u = v & masks.get(t, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - v.bit_count()


SIMILARITIES = ("rouge_l", "same_payload")
RARE_SHARE = 0.01  # a word in at most this share of the pool's texts is payload, not template


def common_words(texts: Iterable[list[str]], rare_share: float = RARE_SHARE) -> frozenset[str]:
    """The template words of tokenized ``texts``: in more than ``rare_share`` of them (and
    in at least two)."""
    df: Counter = Counter()
    n = 0
    for tokens in texts:
        df.update(set(tokens))
        n += 1
    cut = max(1, int(rare_share * n))
    return frozenset(t for t, c in df.items() if c > cut)


def payload(tokens: Sequence[str], common: frozenset[str]) -> frozenset[str]:
    """What a text asks about: its numbers and its words that are not template words."""
    return frozenset(t for t in tokens if t.isdigit() or t not in common)


def rouge_l_f(lcs: int, candidate_len: int, reference_len: int) -> float:
    """F-measure exactly as rouge-score computes it for _score_lcs(candidate, reference)."""
    if not candidate_len or not reference_len:
        return 0.0
    precision = lcs / reference_len
    recall = lcs / candidate_len
    return scoring.fmeasure(precision, recall)


class Vocabulary:
    def __init__(self):
        self.ids: dict[str, int] = {}

    def encode(self, tokens: Iterable[str], grow: bool = True) -> list[int]:
        out = []
        for t in tokens:
            i = self.ids.get(t)
            if i is None:
                if not grow:
                    i = -1  # a token no indexed text has: it can match nothing
                else:
                    i = self.ids[t] = len(self.ids)
            out.append(i)
        return out


@dataclass
class _Segment:
    """A CSR inverted index over a run of documents (global ids ``start``..``end``)."""

    ptr: np.ndarray  # token t's postings are [ptr[t], ptr[t + 1])
    docs: np.ndarray  # global document ids
    counts: np.ndarray  # the token's count in each
    start: int
    end: int

    @classmethod
    def build(cls, docs: Sequence[list[int]], start: int, n_vocab: int) -> _Segment:
        per_token: list[list[tuple[int, int]]] = [[] for _ in range(n_vocab)]
        for d, doc in enumerate(docs, start):
            for t, c in Counter(doc).items():
                per_token[t].append((d, c))
        sizes = np.array([len(p) for p in per_token], dtype=np.int64)
        flat = [x for p in per_token for x in p]
        return cls(
            ptr=np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
            docs=np.array([d for d, _ in flat], dtype=np.int64),
            counts=np.array([c for _, c in flat], dtype=np.int64),
            start=start,
            end=start + len(docs),
        )


@dataclass
class RougeIndex:
    """An inverted index over reference texts for bounded ROUGE-L queries.

    Documents are indexed in segments: texts added together (a pool, a round's additions)
    become a segment, and segments of similar size merge (as an LSM tree does), so adding a
    round's instructions costs about that round's size, never a rebuild of everything; a
    few texts added one at a time (accepted candidates) wait in a small dynamic part first.
    A query touches only its tokens' postings: its cost grows with them, not with the
    number of indexed texts.
    """

    threshold: float
    vocab: Vocabulary = field(default_factory=Vocabulary)
    docs: list[list[int]] = field(default_factory=list)
    segments: list[_Segment] = field(default_factory=list)
    _lengths: list[int] = field(default_factory=list)
    _lengths_np: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    _static_n: int = 0
    _dynamic: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    merge_every: int = 512
    # same_payload: only texts with a candidate's payload count (None: the plain rule)
    common: frozenset[str] | None = None
    payloads: list[frozenset[str]] = field(default_factory=list)

    @classmethod
    def build(
        cls, texts: Iterable[str], threshold: float, common: frozenset[str] | None = None
    ) -> RougeIndex:
        index = cls(threshold=threshold, common=common)
        index.extend(texts)
        return index

    def extend(self, texts: Iterable[str]) -> None:
        """Index ``texts`` as a new segment (merged with others of its size)."""
        self._flush_dynamic()
        tokenized = [rouge_tokens(t) for t in texts]
        if not tokenized:
            return
        if self.common is not None:
            self.payloads += [payload(tokens, self.common) for tokens in tokenized]
        docs = [self.vocab.encode(tokens) for tokens in tokenized]
        self._append_segment(docs)

    def _append_segment(self, docs: list[list[int]]) -> None:
        start = len(self.docs)
        self.docs += docs
        self._lengths += [len(d) for d in docs]
        self.segments.append(_Segment.build(docs, start, len(self.vocab.ids)))
        # merge while the newest is at least half the one before: O(log n) segments
        while len(self.segments) > 1 and 2 * _size(self.segments[-1]) >= _size(self.segments[-2]):
            b, a = self.segments.pop(), self.segments.pop()
            self.segments.append(
                _Segment.build(self.docs[a.start : b.end], a.start, len(self.vocab.ids))
            )
        self._lengths_np = np.array(self._lengths, dtype=np.int64)
        self._static_n = len(self.docs)
        self._dynamic = {}

    def _flush_dynamic(self) -> None:
        """The texts added one at a time become a segment of their own."""
        if len(self.docs) > self._static_n:
            waiting = self.docs[self._static_n :]
            del self.docs[self._static_n :]
            del self._lengths[self._static_n :]
            self._append_segment(waiting)

    def add(self, text: str) -> None:
        words = rouge_tokens(text)
        if self.common is not None:
            self.payloads.append(payload(words, self.common))
        tokens = self.vocab.encode(words)
        d = len(self.docs)
        self.docs.append(tokens)
        self._lengths.append(len(tokens))
        for t, c in Counter(tokens).items():
            self._dynamic.setdefault(t, []).append((d, c))
        if len(self.docs) - self._static_n >= self.merge_every:
            self._flush_dynamic()

    def __len__(self) -> int:
        return len(self.docs)

    def _static_survivors(self, cand: list[int], counts: Counter) -> np.ndarray:
        """Indices of indexed docs whose overlap bound is above the threshold; the work is
        the candidate's tokens' postings (their documents), not the number of documents."""
        if not self.segments:
            return np.zeros(0, dtype=np.int64)
        parts_d, parts_c = [], []
        for seg in self.segments:
            for t, c in counts.items():
                if t < 0 or t >= len(seg.ptr) - 1:
                    continue
                lo, hi = seg.ptr[t], seg.ptr[t + 1]
                if lo == hi:
                    continue
                parts_d.append(seg.docs[lo:hi])
                parts_c.append(np.minimum(seg.counts[lo:hi], c))
        if not parts_d:
            return np.zeros(0, dtype=np.int64)
        touched, inverse = np.unique(np.concatenate(parts_d), return_inverse=True)
        ov = np.bincount(inverse, weights=np.concatenate(parts_c))
        precision = ov / self._lengths_np[touched]
        recall = ov / len(cand)
        bound = 2 * precision * recall / (precision + recall)  # rouge-score's formula, same order
        return touched[bound > self.threshold]

    def _dynamic_survivors(self, cand: list[int], counts: Counter) -> list[int]:
        overlap: dict[int, int] = {}
        for t, c in counts.items():
            for d, dc in self._dynamic.get(t, ()):
                overlap[d] = overlap.get(d, 0) + min(c, dc)
        return [
            d
            for d, ov in overlap.items()
            if rouge_l_f(ov, len(cand), len(self.docs[d])) > self.threshold
        ]

    def max_match(self, text: str) -> tuple[float, int]:
        """(best F above the threshold, doc index), or (0.0, -1) when none is above it;
        with ``common`` set, among the texts with ``text``'s payload only."""
        words = rouge_tokens(text)
        cand = self.vocab.encode(words, grow=False)
        if not cand:
            return 0.0, -1
        counts = Counter(cand)
        best, best_doc = 0.0, -1
        survivors = list(self._static_survivors(cand, counts)) + self._dynamic_survivors(
            cand, counts
        )
        if self.common is not None:
            asks = payload(words, self.common)
            survivors = [d for d in survivors if self.payloads[d] == asks]
        for d in survivors:
            doc = self.docs[d]
            f = rouge_l_f(lcs_length(cand, doc), len(cand), len(doc))
            if f > best:
                best, best_doc = f, int(d)
        return (best, best_doc) if best > self.threshold else (0.0, -1)

    def exceeds(self, text: str) -> bool:
        return self.max_match(text)[1] >= 0


def _size(seg: _Segment) -> int:
    return seg.end - seg.start


class Deduper:
    """Accept/reject candidates in order, as the method does: a candidate is rejected when
    its ROUGE-L F is above the threshold against any pool text or any candidate accepted
    before it. The pool index is built once and reused across waves of candidates."""

    def __init__(self, pool: Sequence[str], threshold: float = 0.7, similarity: str = "rouge_l"):
        if similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {SIMILARITIES}, not {similarity!r}")
        self.threshold = threshold
        self.pool_texts = list(pool)
        common = None
        if similarity == "same_payload":  # template words, from the pool as the round starts
            common = common_words(rouge_tokens(t) for t in self.pool_texts)
        self.pool_index = RougeIndex.build(self.pool_texts, threshold, common)
        self.accepted_texts: list[str] = []
        self.accepted = RougeIndex(threshold=threshold, common=common)

    def similar_to_pool(self, text: str) -> bool:
        return self.pool_index.exceeds(text)

    def offer(self, text: str, similar_to_pool: bool | None = None) -> bool:
        """True (and remembered) when ``text`` is new enough. ``similar_to_pool`` may come
        precomputed (e.g. in parallel on Ray); the accepted-candidates check is sequential."""
        return self.reason(text, similar_to_pool) is None

    def reason(self, text: str, similar_to_pool: bool | None = None) -> str | None:
        """None (and ``text`` remembered) when it is new enough, else why not:
        ``similar_to_pool`` or ``similar_to_accepted`` (a candidate accepted before it)."""
        if similar_to_pool is None:
            similar_to_pool = self.similar_to_pool(text)
        if similar_to_pool:
            return "similar_to_pool"
        if self.accepted.exceeds(text):
            return "similar_to_accepted"
        self.accepted.add(text)
        self.accepted_texts.append(text)
        return None

    def nearest(self, text: str, reason: str) -> tuple[float, str | None]:
        """(ROUGE-L F, text) of the text most like ``text`` among those its ``reason``
        names (Cache Pool or accepted candidates) and above the threshold; (0.0, None)
        when there is none."""
        if reason == "similar_to_pool":
            index, texts = self.pool_index, self.pool_texts
        else:
            index, texts = self.accepted, self.accepted_texts
        score, doc = index.max_match(text)
        return score, texts[doc] if doc >= 0 else None


def dedup(
    pool: Sequence[str],
    candidates: Sequence[str],
    threshold: float = 0.7,
    similarity: str = "rouge_l",
) -> list[bool]:
    """Decisions for ``candidates`` in order against ``pool`` (see :class:`Deduper`)."""
    deduper = Deduper(pool, threshold, similarity)
    return [deduper.offer(c) for c in candidates]


def naive_decisions(
    pool: Sequence[str],
    candidates: Sequence[str],
    threshold: float = 0.7,
    similarity: str = "rouge_l",
) -> list[bool]:
    """The reference: rouge-score over all pairs, one candidate at a time (the original way);
    with ``same_payload``, over the pairs whose payloads are equal."""
    common = None
    if similarity == "same_payload":
        common = common_words(rouge_tokens(t) for t in pool)
    accepted: list[str] = []
    decisions = []
    for cand in candidates:
        cand_tokens = rouge_tokens(cand)
        scores = [
            rouge_scorer._score_lcs(cand_tokens, rouge_tokens(t)).fmeasure
            for t in list(pool) + accepted
            if common is None or payload(rouge_tokens(t), common) == payload(cand_tokens, common)
        ]
        keep = max(scores, default=0.0) <= threshold
        if keep:
            accepted.append(cand)
        decisions.append(keep)
    return decisions
