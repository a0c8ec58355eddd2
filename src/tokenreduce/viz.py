"""Pictures of what a method kept: the input image with discarded patches greyed out.

Works for any method at any site that reports ``Handle.surviving_patches()``
(every ViT-side and pre-LLM method): the method runs on the image through the
model's vision path and the last forward's surviving tokens are drawn.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

GREY = 0.5
FADE = 0.8  # how much of a discarded patch is replaced by grey


def to_display(pixels: torch.Tensor) -> np.ndarray:
    """[C, H, W] model input (any normalisation) -> [H, W, 3] floats in [0, 1] for display."""
    image = pixels.detach().float()
    image = (image - image.min()) / (image.max() - image.min()).clamp_min(1e-12)
    image = image.expand(3, -1, -1) if image.shape[0] == 1 else image[:3]
    return image.permute(1, 2, 0).cpu().numpy()


def grey_out(image: np.ndarray, alive: torch.Tensor, grid: tuple[int, int]) -> np.ndarray:
    """Blend the patches not in ``alive`` ([rows*cols] bool, raster order) toward grey."""
    rows, cols = grid
    height, width = image.shape[:2]
    mask = alive.view(rows, cols).cpu().numpy().astype(np.float32)
    mask = np.kron(mask, np.ones((height // rows, width // cols), dtype=np.float32))[:, :, None]
    return image * (mask + (1 - mask) * (1 - FADE)) + (1 - mask) * FADE * GREY


def save_panels(panels: list[tuple[str, np.ndarray]], path: str | Path) -> None:
    """Save titled images side by side as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 2.9), squeeze=False)
    for ax, (title, image) in zip(axes[0], panels):
        ax.imshow(image, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
