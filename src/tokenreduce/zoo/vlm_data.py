"""Data for the `digits-vlm` zoo model: 2x2 grids of digits, questions, answers.

A grid puts four scikit-learn digits (32x32 each, from `tokenreduce.zoo.digits`)
into one 64x64 single-channel image. With 4x4 patches that is 256 image
tokens, 64 per digit and most of them background, so token reduction has
plenty of near-duplicates to remove and a few tokens that matter.

Three kinds of question, each worded so that the key word comes last and is a
single token (with `what digit is at the top left ?` the same model stayed at
guessing level, see ZOO.md), and each answered by one token then `</s>`:

- position: `what digit is at top-left` -> `7`
- count:    `how many are 3`            -> `0` .. `4`
- compare:  `is top-left larger than bottom-right` -> `yes` / `no`

Grids for training come only from the train split and held-out prompts only
from the test split, so reported accuracy is on digits the model never saw.
"""

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from tokenreduce.zoo.digits import IMAGE_SIZE, Split, digits_split, random_shift

GRID = 2
"""Cells per side of the grid."""

GRID_IMAGE_SIZE = GRID * IMAGE_SIZE
"""Side of the grid image in pixels: 64."""

PATCH_SIZE = 4
IMAGE_TOKENS = (GRID_IMAGE_SIZE // PATCH_SIZE) ** 2
"""Image tokens per image at the LLM input: 16x16 = 256 ([CLS] is dropped)."""

POSITIONS = ("top-left", "top-right", "bottom-left", "bottom-right")
"""Cell names in row-major order; `digits[i]` of a grid is the digit at POSITIONS[i]."""

KINDS = ("position", "count", "compare")

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<image>")
WORDS = ("what", "digit", "is", "at", "how", "many", "are", "larger", "than", *POSITIONS,
         *(str(d) for d in range(10)), "yes", "no")

EVAL_SEED = 1234
"""Seed of the shared held-out set: everyone evaluates on the same prompts."""


@dataclass(frozen=True)
class Turn:
    """One question and its one-token answer."""

    kind: str
    question: str
    answer: str


@dataclass(frozen=True)
class Example:
    """One grid image with the question-answer turns asked about it."""

    pixel_values: torch.Tensor
    """[1, 64, 64] float32, normalised like `digits_split`."""
    digits: tuple[int, ...]
    """The four digits in row-major order (see POSITIONS)."""
    turns: tuple[Turn, ...]


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the fixed vocabulary of the questions.

    Word-level keeps every position name, digit and answer a single token, so
    the answer is exactly the first generated token. `<image>` is registered as
    the named extra special token `image_token`, as in llava-hf tokenizers.
    Padding is on the left because batched generation needs it.
    """
    vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, *WORDS))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
        model_max_length=512,
    )


def encode_dialogue(
    tokenizer: PreTrainedTokenizerFast, image_token_count: int, turns: Sequence[tuple[str, str | None]]
) -> tuple[list[int], list[int]]:
    """Token ids and labels for `<s> <image>*n q1 a1 </s> q2 a2 </s> ...`.

    Labels are -100 everywhere except on each answer and its `</s>`, so the
    loss teaches answering, not predicting questions or pixels. A final turn
    whose answer is None ends at the question: that is a generation prompt.
    """
    ids = [tokenizer.bos_token_id, *[tokenizer.image_token_id] * image_token_count]
    labels = [-100] * len(ids)
    for question, answer in turns:
        question_ids = tokenizer(question, add_special_tokens=False)["input_ids"]
        ids += question_ids
        labels += [-100] * len(question_ids)
        if answer is not None:
            answer_ids = [*tokenizer(answer, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
            ids += answer_ids
            labels += answer_ids
    return ids, labels


def encode(
    tokenizer: PreTrainedTokenizerFast, image_token_count: int, question: str, answer: str | None = None
) -> tuple[list[int], list[int]]:
    """Single-turn `encode_dialogue`: the prompt alone when `answer` is None."""
    return encode_dialogue(tokenizer, image_token_count, [(question, answer)])


def make_batch(
    tokenizer: PreTrainedTokenizerFast,
    examples: Sequence[Example],
    for_generation: bool = False,
    image_token_count: int = IMAGE_TOKENS,
) -> dict[str, torch.Tensor]:
    """Pad examples into model inputs.

    Training batches hold every turn with its answer, padded on the right so
    that real tokens keep positions 0..n-1 as in `generate`, and carry
    `labels`. Generation batches hold only the first question, padded on the
    left so every prompt ends at the last column, and carry no labels (the
    answer is not in the input; `answer_accuracy` compares it).
    """
    if for_generation:
        encoded = [encode(tokenizer, image_token_count, ex.turns[0].question) for ex in examples]
    else:
        encoded = [encode_dialogue(tokenizer, image_token_count, [(t.question, t.answer) for t in ex.turns])
                   for ex in examples]
    length = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(examples), length), tokenizer.pad_token_id)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.int64)
    labels = torch.full((len(examples), length), -100)
    for row, (ids, row_labels) in enumerate(encoded):
        span = slice(length - len(ids), length) if for_generation else slice(0, len(ids))
        input_ids[row, span] = torch.tensor(ids)
        attention_mask[row, span] = 1
        labels[row, span] = torch.tensor(row_labels)
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pixel_values": torch.stack([ex.pixel_values for ex in examples]),
    }
    if not for_generation:
        batch["labels"] = labels
    return batch


class GridSampler:
    """Seeded source of grids and questions drawn from one split of the digits.

    Python's `random` picks digits and questions, a torch generator draws the
    shifts; both are seeded from `seed`, so a sampler replays exactly.
    `shift=True` moves each digit by up to one original pixel inside its cell
    (training augmentation); held-out prompts are unshifted.
    """

    def __init__(self, split: Split, seed: int, shift: bool = False) -> None:
        self.images, labels = digits_split(split)
        self.labels = labels.tolist()
        self.shift = shift
        self.rng = random.Random(seed)
        self.generator = torch.Generator().manual_seed(seed)

    def grids(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`(pixel_values [n, 1, 64, 64], digits [n, 4])` for n random grids."""
        picks = [self.rng.randrange(len(self.labels)) for _ in range(n * GRID * GRID)]
        cells = self.images[picks]
        if self.shift:
            cells = random_shift(cells, self.generator)
        # [n*4, 1, 32, 32] -> [n, 2, 2, 1, 32, 32] -> [n, 1, 2, 32, 2, 32] -> [n, 1, 64, 64]
        cells = cells.view(n, GRID, GRID, 1, IMAGE_SIZE, IMAGE_SIZE).permute(0, 3, 1, 4, 2, 5)
        digits = torch.tensor([self.labels[i] for i in picks]).view(n, GRID * GRID)
        return cells.reshape(n, 1, GRID_IMAGE_SIZE, GRID_IMAGE_SIZE), digits

    def turn(self, digits: Sequence[int], kind: str) -> Turn:
        """A question of `kind` about a grid holding `digits`, with its answer.

        Count questions ask half the time about a digit that is in the grid,
        else about any digit, so that answers are not almost always 0.
        """
        if kind == "position":
            cell = self.rng.randrange(len(POSITIONS))
            return Turn(kind, f"what digit is at {POSITIONS[cell]}", str(digits[cell]))
        if kind == "count":
            target = self.rng.choice(digits) if self.rng.random() < 0.5 else self.rng.randrange(10)
            return Turn(kind, f"how many are {target}", str(list(digits).count(target)))
        if kind == "compare":
            first, second = self.rng.sample(range(len(POSITIONS)), 2)
            answer = "yes" if digits[first] > digits[second] else "no"
            return Turn(kind, f"is {POSITIONS[first]} larger than {POSITIONS[second]}", answer)
        raise ValueError(f"unknown question kind {kind!r}; expected one of {KINDS}")

    def examples(self, n: int, turns: int = 1, kinds: Sequence[str] = KINDS) -> list[Example]:
        """n fresh grids, each with `turns` questions of kinds drawn uniformly from `kinds`."""
        images, digits = self.grids(n)
        result = []
        for image, row in zip(images, digits.tolist()):
            asked = tuple(self.turn(row, self.rng.choice(kinds)) for _ in range(turns))
            result.append(Example(image, tuple(row), asked))
        return result


def eval_set(n_per_kind: int = 300, seed: int = EVAL_SEED) -> list[Example]:
    """Held-out single-question prompts from the test split, `n_per_kind` of each kind.

    Every prompt has its own grid. The default seed is fixed so that every
    measurement of the model, pruned or not, uses the same prompts.
    """
    sampler = GridSampler("test", seed)
    return [ex for kind in KINDS for ex in sampler.examples(n_per_kind, kinds=(kind,))]


@torch.no_grad()
def answer_accuracy(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, examples: Sequence[Example], batch_size: int = 100
) -> dict[str, float]:
    """Fraction of first generated tokens equal to the answer, per question kind.

    Runs the real `generate(input_ids, pixel_values=..., attention_mask=...)`
    path, greedy, left-padded, two new tokens (answer then `</s>`), so token
    reduction methods that patch generation are measured as users run them.
    """
    model.eval()
    correct: dict[str, list[bool]] = {}
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        batch = make_batch(tokenizer, chunk, for_generation=True)
        generated = model.generate(
            batch["input_ids"],
            pixel_values=batch["pixel_values"],
            attention_mask=batch["attention_mask"],
            max_new_tokens=2,
            do_sample=False,
        )
        first = generated[:, batch["input_ids"].shape[1]].tolist()
        for ex, token in zip(chunk, first):
            turn = ex.turns[0]
            correct.setdefault(turn.kind, []).append(token == tokenizer.convert_tokens_to_ids(turn.answer))
    return {kind: sum(hits) / len(hits) for kind, hits in correct.items()}
