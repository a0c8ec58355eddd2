"""Train the `digits-dit` zoo model: a class-conditional DiT generating 16x16 digits.

Run as `python -m tokenreduce.zoo.train_digits_dit [--steps 2400 --out DIR --threads 2]`.
The model is a stock `diffusers.DiTTransformer2DModel` in pixel space, so
diffusion caching methods (ToCa, FORA, TeaCache, ...) patch the real diffusers
code, and it is saved with `save_pretrained` so it loads like a Hub checkpoint.
Quality is judged by digits-vit on the generated digits.
"""

import argparse
import copy
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DiTTransformer2DModel

from tokenreduce.zoo.shipping import save_shipped
from tokenreduce.zoo.dit_sampling import NULL_CLASS, NUM_CLASSES, SAMPLE_SIZE, digits16, judge, make_scheduler, sample

DEFAULT_OUT = Path(__file__).parent / "digits_dit"
SHIPPED_FILES = ("config.json", "diffusion_pytorch_model.safetensors")
LABEL_DROPOUT = 0.1
"""Fraction of training labels replaced by NULL_CLASS so that the same model
also learns the unconditional prediction needed for classifier-free guidance."""


def build_model() -> DiTTransformer2DModel:
    """A 6-layer, 128-wide DiT over 2x2 patches of 16x16x1 pixels: 64 tokens.

    `out_channels` is left at `in_channels`, so the output is epsilon only (no
    learned-sigma half to split off). `num_embeds_ada_norm` is the number of
    real classes; diffusers adds the null class as one extra row.

    Every block owns a label embedder that drops labels by itself in training
    mode (10%, hard-coded), independently per block. Labels are dropped once,
    for the whole model, in `train` instead, so the built-in dropout is turned
    off here; the null-class row still exists because the table is sized at
    construction. (The setting is not part of the config, so a reloaded model
    has it back on, which only matters if it is trained again.)
    """
    model = DiTTransformer2DModel(
        num_attention_heads=4,
        attention_head_dim=32,
        in_channels=1,
        num_layers=6,
        sample_size=SAMPLE_SIZE,
        patch_size=2,
        num_embeds_ada_norm=NUM_CLASSES,
    )
    for block in model.transformer_blocks:
        block.norm1.emb.class_embedder.dropout_prob = 0.0
    return model


def train(steps: int, batch_size: int = 64, lr: float = 5e-4, ema_decay: float = 0.999, seed: int = 0) -> DiTTransformer2DModel:
    """DDPM epsilon-prediction training with AdamW; returns the EMA weights in eval mode.

    The EMA decay warms up as `(1 + step) / (10 + step)` (as diffusers' EMAModel
    does) so that the random initial weights do not linger in a short run.
    Seeded, so reruns match.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    images, labels = digits16("train")
    scheduler = make_scheduler()
    model = build_model().train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    running_loss = 0.0
    for step in range(1, steps + 1):
        batch = torch.randint(0, len(labels), (batch_size,), generator=generator)
        x0, y = images[batch], labels[batch]
        y = torch.where(torch.rand(batch_size, generator=generator) < LABEL_DROPOUT, NULL_CLASS, y)
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
        x_t = scheduler.add_noise(x0, noise, t)
        loss = F.mse_loss(model(hidden_states=x_t, timestep=t, class_labels=y).sample, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), model.parameters(), strict=True):
                p_ema.lerp_(p, 1 - decay)
        running_loss += loss.item()
        if step % 100 == 0:
            print(f"step {step}/{steps}  loss {running_loss / 100:.4f}", flush=True)
            running_loss = 0.0
    return ema


def generated_accuracy(model: DiTTransformer2DModel, guidance: float | None, per_class: int = 20, seed: int = 0) -> float:
    """Fraction of `per_class` DDIM-50 samples per digit that digits-vit judges as the asked class."""
    labels = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
    images = sample(model, labels, steps=50, guidance=guidance, generator=torch.Generator().manual_seed(seed))
    return (judge(images) == labels).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2400)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument(
        "--threads", type=int, default=2, help="torch threads; 1 is several times faster when other jobs share the cores"
    )
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model = train(args.steps)
    minutes = (time.perf_counter() - started) / 60
    save_shipped(args.out, model, make_scheduler(), keep=(*SHIPPED_FILES, "scheduler_config.json"))
    print(f"trained {args.steps} steps in {minutes:.1f} min; saved to {args.out}", flush=True)

    for guidance in (2.0, None):
        started = time.perf_counter()
        accuracy = generated_accuracy(model, guidance)
        seconds = time.perf_counter() - started
        print(f"CFG {guidance or 'off'}: class accuracy of 200 DDIM-50 samples {accuracy:.4f} ({seconds:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
