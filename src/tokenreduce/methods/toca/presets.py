"""ToCa's per-model schedules from the official code (METHODS.md D1.5, D1.6), as data.

The fresh ratio of unit m in block l at step t is

    rho = rho0 * f(w_layer, l / (L - 1)) * f(w_step, x_t) * module_factor(m) * group_factor,   clamped to [0, 1],

with f(w, x) = 1 + w (1 - 2x) (mean 1 over [0, 1]) and x_t = step / T, or the
backward diffusion index (T - 1 - step) / T for DiT. ``full_rule`` is when all
tokens are recomputed: "every" (the first ``warmup`` steps, then every N),
"pixart" (step mod N_eff == 0 with N_eff = round(N / (0.8 + 0.4 step / T))
refreshed at full steps), "dit" (index mod N_eff == 0 with
N_eff = round(N / (1.4 - 0.8 idx / T)), forced to 2 for idx in [0.2 T, 0.4 T)).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ToCaPreset:
    interval: int  # N, the force-activation cycle
    fresh_ratio: float  # rho0
    layer_weight: float
    step_weight: float
    backward_steps: bool  # DiT's step factor runs on the backward diffusion index
    self_factor: float  # self / joint attention: reused whole below 1 (never partially recomputed, D1.3)
    cross_factor: float
    mlp_factor: float
    group_factors: tuple[tuple[str, float], ...]  # Flux: double-stream x0.4, single-stream x1.6
    spatial_cell: int  # s4 window (0 = off)
    spatial_bonus: float  # s4 lambda_4
    score: str  # "self_attn" (s1) or "cross_entropy" (s2)
    full_rule: str  # "every", "pixart" or "dit"
    warmup: int  # leading steps always computed in full
    shared: bool  # CFG halves of a doubled batch select the same tokens


PRESETS: dict[str, ToCaPreset] = {
    # PixArt-alpha, 20-step DPM-Solver++, cfg 4.5: cross-attention entropy, 4x4 s4 with 0.4, CFG-shared selection.
    "pixart": ToCaPreset(3, 0.30, 0.6, 0.9, False, 0.0, 0.6, 1.6, (), 4, 0.4, "cross_entropy", "pixart", 1, True),
    # DiT-XL/2, DDPM 250 steps: self-attention column sums, 2x2 s4 with 0.6, attention x0 and MLP x2.5.
    "dit-ddpm250": ToCaPreset(4, 0.07, 0.8, 0.4, True, 0.0, 0.0, 2.5, (), 2, 0.6, "self_attn", "dit", 1, False),
    # DiT-XL/2, DDIM 50 steps ("ToCa-ddim50" ratio scheduler): more refresh in deep layers and late steps.
    "dit-ddim50": ToCaPreset(3, 0.07, -0.2, 2.0, True, 0.0, 0.0, 2.5, (), 2, 0.6, "self_attn", "dit", 1, False),
    # FLUX.1-dev, 50 steps: steps 0-2 full then every 4, layer ramp 1.5 -> 0.5, no s4.
    "flux": ToCaPreset(4, 0.10, 0.5, 0.0, False, 0.0, 1.0, 1.0, (("double", 0.4), ("single", 1.6)), 0, 0.0, "self_attn", "every", 3, False),
    # No per-layer / step / module shaping: every unit uses rho0 (rho0 = 1 recomputes everything, attention included).
    "constant": ToCaPreset(3, 0.10, 0.0, 0.0, False, 1.0, 1.0, 1.0, (), 0, 0.0, "auto", "every", 1, False),
}

AUTO = {"pixart": "pixart", "dit": "dit-ddim50", "flux": "flux", "sd3": "constant"}
"""Preset chosen by ``preset="auto"`` for each model family (SD3 has no reference schedule)."""


def ramp(weight: float, x: float) -> float:
    """f(w, x) = 1 + w (1 - 2x): 1 + w at x = 0, 1 - w at x = 1."""
    return 1.0 + weight * (1.0 - 2.0 * x)


def next_interval(rule: str, interval: int, index: int, num_steps: int) -> int:
    """N_eff after a full step at ``index`` (forward step for "pixart", backward diffusion index for "dit")."""
    if rule == "pixart":
        return max(1, round(interval / (0.8 + 0.4 * index / num_steps)))
    if 0.2 * num_steps <= index < 0.4 * num_steps:
        return 2  # "in 50~100 steps [of 250], the model is extremely sensitive for cache"
    return max(1, round(interval / (1.4 - 0.8 * index / num_steps)))
