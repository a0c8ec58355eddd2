"""Tiny diffusion transformers of the real diffusers classes, built in-process, and a sampling loop.

Every model has hidden size 32 (2 heads of 16), 2 blocks per block list and an
8 x 8 grid of image tokens (latents 16 x 16 with 2 x 2 patches; Flux: 64 packed
tokens), enough to select token subsets and to test s4's grid cells.
The loop (:func:`sample`) is a plain Euler-style update: what matters here is
that the transformer sees decreasing timesteps, with or without classifier-free
guidance, exactly as a pipeline would call it.
"""

from __future__ import annotations

import torch
from diffusers import DiTTransformer2DModel, FluxTransformer2DModel, PixArtTransformer2DModel, SD3Transformer2DModel

HEADS, HEAD_DIM, TEXT, TEXT_DIM = 2, 16, 6, 24


def _build(name: str) -> torch.nn.Module:
    common = dict(num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, num_layers=2)
    if name == "dit":
        return DiTTransformer2DModel(**common, in_channels=4, out_channels=8, sample_size=16, patch_size=2)
    if name == "pixart":
        return PixArtTransformer2DModel(
            **common, in_channels=4, out_channels=8, sample_size=16, patch_size=2, cross_attention_dim=32, caption_channels=TEXT_DIM
        )
    if name == "flux":
        return FluxTransformer2DModel(
            **common, num_single_layers=2, in_channels=16, joint_attention_dim=TEXT_DIM, pooled_projection_dim=TEXT_DIM, axes_dims_rope=(4, 6, 6)
        )
    if name == "sd3":
        return SD3Transformer2DModel(
            **common, sample_size=16, patch_size=2, in_channels=4, out_channels=4, joint_attention_dim=TEXT_DIM, caption_projection_dim=32,
            pooled_projection_dim=TEXT_DIM, pos_embed_max_size=16, qk_norm="rms_norm", dual_attention_layers=(0,),
        )
    raise KeyError(name)


NAMES = ("dit", "pixart", "flux", "sd3")


def build(name: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    model = _build(name).eval()
    if dtype != torch.float32:
        model = model.to(dtype)
    with torch.no_grad():  # adaLN-Zero / zero-initialised output layers would make every block an identity
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.copy_(torch.randn_like(p) * 0.1)
    return model


def latents(name: str, batch: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (batch, 64, 16) if name == "flux" else (batch, 4, 16, 16)
    return torch.randn(shape, generator=g).to(dtype)


def condition(name: str, batch: int, seed: int = 100, dtype: torch.dtype = torch.float32) -> dict:
    """Per-sample conditioning (class labels or text), sliceable on dim 0."""
    g = torch.Generator().manual_seed(seed)
    if name == "dit":
        return {"class_labels": torch.randint(0, 1000, (batch,), generator=g)}
    text = torch.randn(batch, TEXT, TEXT_DIM, generator=g).to(dtype)
    if name == "pixart":
        mask = torch.ones(batch, TEXT, dtype=torch.long)
        mask[:, -2:] = 0  # padded prompt tokens: the encoder mask must reach cross-attention and the score probe
        return {"encoder_hidden_states": text, "encoder_attention_mask": mask}
    return {"encoder_hidden_states": text, "pooled_projections": torch.randn(batch, TEXT_DIM, generator=g).to(dtype)}


def null_condition(name: str, batch: int, dtype: torch.dtype = torch.float32) -> dict:
    """The unconditional branch: the null class for DiT, zero text elsewhere."""
    if name == "dit":
        return {"class_labels": torch.full((batch,), 1000)}
    cond = condition(name, batch, dtype=dtype)
    return {k: torch.zeros_like(v) if v.is_floating_point() else v for k, v in cond.items()}


def timesteps(name: str, steps: int) -> list[float]:
    if name == "flux":
        return torch.linspace(1.0, 1.0 / steps, steps).tolist()
    return torch.linspace(999, 0, steps).round().tolist()


def call(model: torch.nn.Module, name: str, x: torch.Tensor, t: float, cond: dict) -> torch.Tensor:
    batch = x.shape[0]
    kwargs = dict(cond)
    if name == "flux":
        rows = torch.arange(8).repeat_interleave(8)
        cols = torch.arange(8).repeat(8)
        kwargs.update(img_ids=torch.stack([torch.zeros(64), rows, cols], dim=1).to(x.device), txt_ids=torch.zeros(TEXT, 3, device=x.device))
    timestep = torch.full((batch,), t, device=x.device).to(torch.long if name in ("dit", "pixart") else torch.float32)
    out = model(x, timestep=timestep, return_dict=False, **kwargs)[0]
    return out[:, : x.shape[1]] if name in ("dit", "pixart") else out  # drop the learned-sigma channels


def to(cond: dict, device: torch.device | str) -> dict:
    return {k: v.to(device) for k, v in cond.items()}


def _cat(a: dict, b: dict) -> dict:
    return {k: torch.cat([a[k], b[k]]) for k in a}


def sample(model: torch.nn.Module, name: str, x: torch.Tensor, cond: dict, steps: int = 6, cfg: str = "none", scale: float = 3.0) -> torch.Tensor:
    """Denoise ``x`` for ``steps`` steps; cfg: "none", "batched" ([uncond, cond] in one call) or "sequential" (two calls per step)."""
    uncond = to(null_condition(name, x.shape[0], dtype=x.dtype), x.device) if cfg != "none" else None
    with torch.no_grad():
        for t in timesteps(name, steps):
            if cfg == "batched":
                eps_u, eps_c = call(model, name, torch.cat([x, x]), t, _cat(uncond, cond)).chunk(2)
            elif cfg == "sequential":
                eps_c = call(model, name, x, t, cond)
                eps_u = call(model, name, x, t, uncond)
            else:
                eps_u = eps_c = call(model, name, x, t, cond)
            x = x - 0.1 * (eps_u + scale * (eps_c - eps_u))
    return x
