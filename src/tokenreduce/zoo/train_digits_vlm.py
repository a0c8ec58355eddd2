"""Train the `digits-vlm` zoo model: a tiny LLaVA answering questions about 2x2 grids of digits.

Run as `python -m tokenreduce.zoo.train_digits_vlm [--out DIR] [--threads 2]`.
The model is a stock `transformers.LlavaForConditionalGeneration` (CLIP
vision tower + Llama LM), so token reduction is measured on the real Hugging
Face code path, and it is saved with `save_pretrained` next to its tokenizer
so the zoo loads it exactly like a Hub checkpoint.

Trained end to end from scratch, this model only ever learns constant answers
(ZOO.md), so training has two stages, as LLaVA itself does:

1. The tower alone learns dense features: a linear head on every patch of the
   layer the LLM reads predicts the digit of that patch's cell, a small head
   predicts which cell the patch is in, and a head on the pooled [CLS] of the
   last layer predicts all four digits (so the last layer and [CLS] attention
   are trained too, as in a real CLIP, not left random).
2. The projector and the LM learn to answer with the tower frozen, which is
   then unfrozen at a low rate for the second half.
3. Counting leaves guessing level much later than the other kinds, so the
   shipped model continues stage 2 (`--init DIR --count-weight 2`) with
   count questions asked twice as often. The exact commands and figures are
   in the model card, digits_vlm/README.md.
"""

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerFast,
)

from tokenreduce.zoo.shipping import save_shipped
from tokenreduce.zoo.vlm_data import (
    GRID,
    GRID_IMAGE_SIZE,
    IMAGE_TOKENS,
    PATCH_SIZE,
    GridSampler,
    answer_accuracy,
    build_tokenizer,
    eval_set,
    make_batch,
)

DEFAULT_OUT = Path(__file__).parent / "digits_vlm"
VISION_FEATURE_LAYER = -2
"""The LLM reads the tower's penultimate layer, as in LLaVA-1.5."""

MONITOR_SEED = 99
"""Progress prompts (test split, 50 per kind) use another seed than EVAL_SEED,
so the figures in the model card come from prompts never looked at while training."""

_SIDE = GRID_IMAGE_SIZE // PATCH_SIZE
_CELL_OF_PATCH = torch.tensor(
    [(row // (_SIDE // GRID)) * GRID + col // (_SIDE // GRID) for row in range(_SIDE) for col in range(_SIDE)]
)
"""Cell index (0..3, row-major) of each of the 256 patches, in token order."""


def build_model(tokenizer: PreTrainedTokenizerFast) -> LlavaForConditionalGeneration:
    """CLIP tower (128 wide, 4 layers, patch 4 on 64x64x1) + Llama LM (128 wide, 4 layers), untied."""
    vision = CLIPVisionConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=GRID_IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        num_channels=1,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.image_token_id,
        image_seq_length=IMAGE_TOKENS,
        projector_hidden_act="gelu",
        vision_feature_layer=VISION_FEATURE_LAYER,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    model = LlavaForConditionalGeneration(config)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.generation_config, key, getattr(tokenizer, key))
    return model


def _cosine(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    """Learning-rate factor: linear warmup, then cosine from 1 down to `floor`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


class TowerHeads(torch.nn.Module):
    """Stage-1 heads, thrown away afterwards: patch digit, patch cell, [CLS] -> four digits."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.digit = torch.nn.Linear(hidden, 10)
        self.cell = torch.nn.Linear(hidden, GRID * GRID)
        self.grid = torch.nn.Linear(hidden, GRID * GRID * 10)

    def loss(
        self, tower: CLIPVisionModel, pixel_values: torch.Tensor, digits: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Total loss and the patch digit logits [B, 256, 10].

        The cell loss is weighted 0.1: it only has to keep position in the
        features, which the position questions need. The [CLS] loss is
        weighted 0.5 so that the dense patch objective, which the LLM relies
        on, dominates.
        """
        out = tower(pixel_values, output_hidden_states=True)
        patches = out.hidden_states[VISION_FEATURE_LAYER][:, 1:]
        digit_logits = self.digit(patches)
        patch_digits = digits[:, _CELL_OF_PATCH]
        cells = _CELL_OF_PATCH.expand(len(digits), -1)
        grid_logits = self.grid(out.pooler_output).view(-1, GRID * GRID, 10)
        loss = (
            F.cross_entropy(digit_logits.flatten(0, 1), patch_digits.flatten())
            + 0.1 * F.cross_entropy(self.cell(patches).flatten(0, 1), cells.flatten())
            + 0.5 * F.cross_entropy(grid_logits.flatten(0, 1), digits.flatten())
        )
        return loss, digit_logits


@torch.no_grad()
def cell_accuracy(
    tower: CLIPVisionModel, heads: TowerHeads, pixel_values: torch.Tensor, digits: torch.Tensor
) -> tuple[float, float]:
    """(per-patch accuracy, per-cell accuracy from the mean of the cell's patch logits)."""
    tower.eval()
    _, logits = heads.loss(tower, pixel_values, digits)
    patch = (logits.argmax(-1) == digits[:, _CELL_OF_PATCH]).float().mean().item()
    cell_logits = torch.zeros(len(digits), GRID * GRID, 10).index_add_(1, _CELL_OF_PATCH, logits)
    cell = (cell_logits.argmax(-1) == digits).float().mean().item()
    return patch, cell


def train_tower(tower: CLIPVisionModel, steps: int, batch_size: int, lr: float, seed: int) -> None:
    """Stage 1: dense per-patch digit classification on shifted train-split grids.

    The loss sits at chance for a few hundred steps before it breaks through
    (ZOO.md), so stopping early is what made the first attempt fail.
    """
    sampler = GridSampler("train", seed, shift=True)
    test_pixels, test_digits = GridSampler("test", MONITOR_SEED).grids(200)
    heads = TowerHeads(tower.config.hidden_size)
    parameters = [*tower.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.05)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _cosine(s, steps, warmup=50))
    started, losses = time.perf_counter(), []
    for step in range(1, steps + 1):
        tower.train()
        loss, _ = heads.loss(tower, *sampler.grids(batch_size))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == steps:
            patch, cell = cell_accuracy(tower, heads, test_pixels, test_digits)
            print(f"stage 1 step {step}/{steps}  loss {sum(losses) / len(losses):.3f}  test patch acc {patch:.3f}  "
                  f"cell acc {cell:.3f}  {time.perf_counter() - started:.0f} s", flush=True)
            losses.clear()
    tower.eval()


def train_answers(
    model: LlavaForConditionalGeneration,
    tokenizer: PreTrainedTokenizerFast,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    turns: int = 6,
    position_warmup: int = 200,
    unfreeze_at: float = 0.45,
    tower_lr: float = 1e-4,
    count_weight: int = 1,
) -> None:
    """Stage 2: projector + LM answer questions; the tower joins at `tower_lr` for the last steps.

    Each grid carries `turns` questions, so the 256 image tokens, the costly
    part of a step, are paid once for several answers. The first
    `position_warmup` steps ask only position questions: counting and
    comparing need the LM to read cells first. Afterwards count questions are
    asked `count_weight` times as often as each other kind: count is the last
    kind to leave guessing level.
    """
    sampler = GridSampler("train", seed, shift=True)
    monitor = eval_set(50, seed=MONITOR_SEED)
    tower = model.model.vision_tower
    tower.requires_grad_(False)
    language = [p for p in model.parameters() if p.requires_grad]
    # The frozen tower has no gradients, which AdamW skips, so its group can sit
    # in the optimizer from the start at its own constant rate.
    optimizer = torch.optim.AdamW(
        [{"params": language}, {"params": list(tower.parameters()), "lr": tower_lr}], lr=lr, weight_decay=0.05
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [lambda s: _cosine(s, steps, warmup=100), lambda s: 1.0])
    unfreeze_step = int(unfreeze_at * steps)
    mix = ("position", *["count"] * count_weight, "compare")
    started, losses = time.perf_counter(), []
    for step in range(1, steps + 1):
        if step == max(1, unfreeze_step):
            tower.requires_grad_(True)
        model.train()
        kinds = ("position",) if step <= position_warmup else mix
        loss = model(**make_batch(tokenizer, sampler.examples(batch_size, turns, kinds))).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if step % 250 == 0 or step == steps:
            accuracy = answer_accuracy(model, tokenizer, monitor)
            shown = "  ".join(f"{kind} {value:.3f}" for kind, value in accuracy.items())
            print(f"stage 2 step {step}/{steps}  loss {sum(losses) / len(losses):.3f}  monitor {shown}  "
                  f"{time.perf_counter() - started:.0f} s", flush=True)
            losses.clear()
    model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads; on a busy 2-core machine 1 can be faster")
    parser.add_argument("--tower-steps", type=int, default=2000)
    parser.add_argument("--tower-batch", type=int, default=8)
    parser.add_argument("--tower-lr", type=float, default=1e-3)
    parser.add_argument("--answer-steps", type=int, default=1800)
    parser.add_argument("--answer-batch", type=int, default=8)
    parser.add_argument("--answer-lr", type=float, default=1e-3)
    parser.add_argument("--unfreeze-at", type=float, default=0.45,
                        help="fraction of stage 2 after which the tower trains too")
    parser.add_argument("--tower-finetune-lr", type=float, default=1e-4)
    parser.add_argument("--count-weight", type=int, default=1,
                        help="how many times as often as each other kind count questions are asked")
    parser.add_argument("--init", type=Path, default=None,
                        help="continue stage 2 from a saved digits-vlm folder (no stage 1, no position warm-up)")
    parser.add_argument("--tower-cache", type=Path, default=None,
                        help="load the stage-1 tower state from this file if it exists, else save it there")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    tokenizer = build_tokenizer()
    if args.init is not None:
        model = LlavaForConditionalGeneration.from_pretrained(args.init)
        print(f"stage 1 skipped: continuing from {args.init}", flush=True)
    else:
        model = build_model(tokenizer)
        tower = model.model.vision_tower
        if args.tower_cache is not None and args.tower_cache.exists():
            tower.load_state_dict(torch.load(args.tower_cache))
            print(f"stage 1 skipped: tower loaded from {args.tower_cache}", flush=True)
        else:
            train_tower(tower, args.tower_steps, args.tower_batch, args.tower_lr, args.seed)
            if args.tower_cache is not None:
                torch.save(tower.state_dict(), args.tower_cache)
    stage1 = time.perf_counter()
    train_answers(model, tokenizer, args.answer_steps, args.answer_batch, args.answer_lr, args.seed + 1,
                  position_warmup=0 if args.init else 200, unfreeze_at=args.unfreeze_at,
                  tower_lr=args.tower_finetune_lr, count_weight=args.count_weight)
    finished = time.perf_counter()
    print(f"trained in {(finished - started) / 60:.1f} min (stage 1 {(stage1 - started) / 60:.1f}, "
          f"stage 2 {(finished - stage1) / 60:.1f})", flush=True)

    save_shipped(args.out, model, tokenizer)
    reloaded = LlavaForConditionalGeneration.from_pretrained(args.out)
    reloaded_tokenizer = PreTrainedTokenizerFast.from_pretrained(args.out)
    accuracy = answer_accuracy(reloaded, reloaded_tokenizer, eval_set())
    print(f"saved to {args.out}; held-out accuracy after reload (300 prompts per kind):")
    for kind, value in accuracy.items():
        print(f"  {kind}: {value:.4f}")


if __name__ == "__main__":
    main()
