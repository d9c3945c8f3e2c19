import pytest

from lion_ray.logic.examples import IGNORE, Encoded, encode_example, pack, pad_batch, unpacked


def chars(text):
    return [ord(c) for c in text]


def test_loss_only_on_response_and_eos():
    ex = encode_example(
        chars, "### Instruction:\nhi\n\n### Response:\n", "yo", eos_id=0, max_length=100
    )
    n_prompt = len("### Instruction:\nhi\n\n### Response:\n")
    assert ex.labels[:n_prompt] == [IGNORE] * n_prompt
    assert ex.labels[n_prompt:] == chars("yo") + [0]
    assert ex.input_ids == chars("### Instruction:\nhi\n\n### Response:\n") + chars("yo") + [0]
    assert not ex.truncated


@pytest.mark.parametrize(
    "prompt_len, answer_len, max_length",
    [(50, 5, 20), (5, 50, 20), (50, 50, 20), (1, 1, 2), (30, 0, 8)],
)
def test_truncation_never_leaves_no_target(prompt_len, answer_len, max_length):
    ex = encode_example(chars, "p" * prompt_len, "a" * answer_len, eos_id=0, max_length=max_length)
    assert len(ex.input_ids) <= max_length and len(ex.labels) == len(ex.input_ids)
    assert ex.target_tokens >= 1
    assert ex.input_ids[0] == ord("p")  # a prompt token always remains before the target


def test_truncation_keeps_the_end_of_the_prompt():
    ex = encode_example(chars, "START" + "x" * 40 + "MARK", "ab", eos_id=0, max_length=20)
    assert ex.truncated
    prompt_part = [t for t, lab in zip(ex.input_ids, ex.labels, strict=True) if lab == IGNORE]
    assert (
        bytes(prompt_part).decode().endswith("MARK") and "START" not in bytes(prompt_part).decode()
    )


def test_packing_restarts_positions_and_respects_length():
    exs = [Encoded([1] * n, [2] * n) for n in (3, 4, 5, 6, 2)]
    seqs = pack(exs, max_length=8)
    assert [len(s) for s in seqs] == [7, 5, 8]
    assert seqs[0].position_ids == [0, 1, 2, 0, 1, 2, 3]
    assert sum(len(s) for s in seqs) == sum(len(e.input_ids) for e in exs)


def test_pad_batch_masks_padding():
    batch = pad_batch(unpacked([Encoded([5, 6, 7], [IGNORE, 6, 7]), Encoded([8], [8])]), pad_id=0)
    assert batch["input_ids"] == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"][1] == [8, IGNORE, IGNORE]
    assert batch["attention_mask"][1] == [1, 0, 0]
    assert batch["position_ids"][1] == [0, 1, 2]


def test_an_epoch_order_is_built_once_per_epoch_not_once_per_micro_batch():
    """The training loop asks for the order at every micro-batch: the permutation is built
    once per epoch (it was built, O(sequences), for every micro-batch), and it is the same
    seeded permutation as before, so training is unchanged."""
    import random

    from lion_ray.logic.examples import EpochOrder

    order = EpochOrder(1000, seed=3)
    for micro in range(3 * 250):  # 3 epochs of 250 micro-batches
        epoch = micro // 250
        got = order(epoch)
    assert order.built == 3
    expected = list(range(1000))
    random.Random(3 * 7919 + 2).shuffle(expected)
    assert got == expected
