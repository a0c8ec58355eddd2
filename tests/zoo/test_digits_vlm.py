"""The shipped digits-vlm: loads like a Hub model, answers held-out questions, data is split-clean."""

import pytest
import torch
from transformers import LlavaForConditionalGeneration, PreTrainedTokenizerFast

from tokenreduce.zoo import ZOO_DIR
from tokenreduce.zoo.digits import IMAGE_SIZE, digits_split
from tokenreduce.zoo.vlm_data import IMAGE_TOKENS, KINDS, GridSampler, answer_accuracy, eval_set, make_batch

FOLDER = ZOO_DIR / "digits_vlm"

MIN_ACCURACY = {"position": 0.9, "count": 0.7, "compare": 0.9}
"""Floors for `eval_set(30)`: measured 1.0 / 0.833 / 1.0 on it (30 prompts
per kind), minus about 10 points, three prompts, of margin."""


@pytest.fixture(scope="module")
def model() -> LlavaForConditionalGeneration:
    return LlavaForConditionalGeneration.from_pretrained(FOLDER).eval()


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast.from_pretrained(FOLDER)


def _cells(pixel_values: torch.Tensor) -> list[bytes]:
    """The four 32x32 cells of each grid image, as bytes for exact set lookups."""
    n = len(pixel_values)
    cells = pixel_values.view(n, 1, 2, IMAGE_SIZE, 2, IMAGE_SIZE).permute(0, 2, 4, 1, 3, 5)
    return [cell.contiguous().numpy().tobytes() for cell in cells.reshape(n * 4, 1, IMAGE_SIZE, IMAGE_SIZE)]


def test_batches_hold_256_image_tokens_per_image(model, tokenizer):
    assert model.config.image_token_id == tokenizer.image_token_id == tokenizer.convert_tokens_to_ids("<image>")
    examples = GridSampler("train", seed=0, shift=True).examples(3, turns=4)
    for for_generation in (False, True):
        batch = make_batch(tokenizer, examples, for_generation=for_generation)
        image_tokens = (batch["input_ids"] == tokenizer.image_token_id).sum(dim=1)
        assert image_tokens.tolist() == [IMAGE_TOKENS] * 3 == [256] * 3
        assert batch["pixel_values"].shape == (3, 1, 64, 64)
    # Training labels cover exactly each answer and its </s>: 4 turns x 2 tokens.
    batch = make_batch(tokenizer, examples)
    answered = batch["labels"] != -100
    assert answered.sum(dim=1).tolist() == [8] * 3
    assert (batch["input_ids"][answered] == tokenizer.eos_token_id).sum() == 3 * 4


def test_generate_answers_held_out_questions(model, tokenizer):
    accuracy = answer_accuracy(model, tokenizer, eval_set(30))
    assert set(accuracy) == set(KINDS)
    for kind, floor in MIN_ACCURACY.items():
        assert accuracy[kind] >= floor, accuracy


def test_generate_emits_answer_then_eos(model, tokenizer):
    example = eval_set(1)[0]
    batch = make_batch(tokenizer, [example], for_generation=True)
    generated = model.generate(**batch, max_new_tokens=2, do_sample=False)
    answer, end = tokenizer.convert_ids_to_tokens(generated[0, -2:].tolist())
    assert answer in {str(d) for d in range(10)} and end == "</s>"


def test_generator_is_deterministic_for_a_seed():
    first = GridSampler("train", seed=7, shift=True).examples(5, turns=3)
    again = GridSampler("train", seed=7, shift=True).examples(5, turns=3)
    other = GridSampler("train", seed=8, shift=True).examples(5, turns=3)
    assert [ex.turns for ex in first] == [ex.turns for ex in again]
    assert all(torch.equal(a.pixel_values, b.pixel_values) for a, b in zip(first, again))
    assert [ex.turns for ex in first] != [ex.turns for ex in other]
    assert [ex.turns for ex in eval_set(5)] == [ex.turns for ex in eval_set(5)]


def test_training_grids_never_use_test_digits():
    train_cells = {image.numpy().tobytes() for image in digits_split("train")[0]}
    test_cells = {image.numpy().tobytes() for image in digits_split("test")[0]}
    pixels, digits = GridSampler("train", seed=3).grids(200)
    assert set(_cells(pixels)) <= train_cells and not set(_cells(pixels)) & test_cells
    held_out = torch.stack([ex.pixel_values for ex in eval_set(20)])
    assert set(_cells(held_out)) <= test_cells
