"""ToCa: token-wise feature caching (arXiv 2410.05317, Algorithm 1; METHODS.md D1).

Full steps compute every unit of every block and store its output (before the
block's gate), the score maps and zeroed staleness counters. Partial steps:

* self / joint attention is reused whole (D1.3: token-wise self-attention lets
  errors spread); its current gate is re-applied by the block;
* cross-attention and MLP recompute only the top ``rho * N`` rows by score
  S = s_base + lambda_3 * s3 (+ s4 bonus) and write them into the cache, where
  s1 = L2norm(attention received by each token at the last full step) (eq. 3),
  s2 = L2norm(1 + entropy of the token's cross-attention) (eq. 4, the code's
  sign: higher entropy is refreshed first), s3 = steps since the token was last
  fresh / N, s4 = x(1 + lambda_4) for the best token of each grid cell (eq. 6).

Unlike the reference, the main attention stays on SDPA: s1 comes from q / k
captured at full steps and a chunked softmax (probe P4, the L x L map is never
stored), s2 from the captured cross-attention q / k of the rows being computed
(probe P5). ``reference_compat`` restores the per-layer full-step quirk (N_eff
updated inside layer 0) and the layer divisor 27. Flux double-stream blocks
reuse the joint attention *after* its output projections, where the reference
re-projects the cached attention every step: the same values, less work.
Inference only: caches are updated in place.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ...config import ReductionConfig, check_choice, check_range
from ...diffusion.method import DiffusionMethod, UnitCall, UnitSpec, check_int, every
from ...diffusion.state import DiffusionRun
from ...errors import ConfigError
from ...ops.cache import cell_bonus, cross_attention_probs, entropy, scatter_rows, top_rows
from ...ops.scoring import attention_received, l2_normalize
from ...registry import register_method
from .presets import AUTO, PRESETS, ToCaPreset, next_interval, ramp

PROBE_CHUNK = 256
"""Query rows per chunk of the attention-received probe: memory O(chunk x L), never L x L."""


@dataclass(frozen=True, kw_only=True)
class ToCaConfig(ReductionConfig):
    """ToCa settings; ``None`` fields come from the preset.

    preset: "auto" (by model: PixArt -> "pixart", DiT -> "dit-ddim50", Flux ->
    "flux", SD3 -> "constant"), "pixart", "dit-ddpm250", "dit-ddim50", "flux" or
    "constant" (METHODS.md D1.5). interval: N, a full step every N steps
    (1 = no caching). fresh_ratio: rho0 in (0, 1], the base fraction of tokens
    recomputed on partial steps. score: "self_attn" (s1) or "cross_entropy" (s2).
    spatial_cell / spatial_bonus: s4 (cell 0 = off). shared_selection_across_cfg:
    both halves of a CFG-doubled batch refresh the same tokens. num_steps: the
    step count for a bare transformer (pipelines: read from the scheduler).
    """

    method = "toca"
    scores: ClassVar[tuple[str, ...]] = ("auto", "self_attn", "cross_entropy")  # accepted ``score`` values
    preset: str = "auto"
    interval: int | None = None
    fresh_ratio: float | None = None
    soft_fresh_weight: float = 0.25
    score: str = "auto"
    spatial_cell: int | None = None
    spatial_bonus: float | None = None
    shared_selection_across_cfg: bool | None = None
    num_steps: int | None = None
    reference_compat: bool = False

    def validate(self) -> None:
        super().validate()
        check_choice(self, "preset", ("auto", *PRESETS))
        check_choice(self, "score", self.scores)
        check_int(self, "interval", 1)
        check_int(self, "spatial_cell", 0)
        check_int(self, "num_steps", 1)
        if self.fresh_ratio is not None:
            check_range(self, "fresh_ratio", 0.0, 1.0, low_open=True)
        check_range(self, "soft_fresh_weight", 0.0, float("inf"))
        if self.spatial_bonus is not None:
            check_range(self, "spatial_bonus", 0.0, float("inf"))


def resolve(config: ToCaConfig, facts: dict[str, Any]) -> ToCaPreset:
    """The preset for this model with the config's overrides applied."""
    preset = PRESETS[AUTO[facts["family"]] if config.preset == "auto" else config.preset]
    has_cross = any(u.kind == "cross" for units in facts["units"].values() for u in units)
    overrides = {
        "interval": config.interval, "fresh_ratio": config.fresh_ratio, "spatial_cell": config.spatial_cell,
        "spatial_bonus": config.spatial_bonus, "shared": config.shared_selection_across_cfg,
        "score": None if config.score == "auto" else config.score,
    }
    preset = dataclasses.replace(preset, **{k: v for k, v in overrides.items() if v is not None})
    if preset.score == "auto":
        preset = dataclasses.replace(preset, score="cross_entropy" if has_cross else "self_attn")
    if preset.score == "cross_entropy" and not has_cross:
        raise ConfigError(
            f"ToCaConfig: score='cross_entropy' needs cross-attention, which {facts['model_class']} does not have; use score='self_attn'"
        )
    return preset


@register_method(ToCaConfig)
class ToCa(DiffusionMethod):
    description = "ToCa: token-wise caching, recompute the top-scored tokens of cross-attention and MLP between full steps"

    def __init__(self, config: ToCaConfig, facts: dict[str, Any]) -> None:
        super().__init__(config, facts)
        self.plan = resolve(config, facts)
        self.shares_cfg_pairs = self.plan.shared
        self.groups = dict(self.plan.group_factors)

    def needs_num_steps(self) -> bool:
        return self.plan.interval > 1 and (self.plan.full_rule != "every" or self.plan.step_weight != 0.0)

    def min_steps(self) -> int:
        return self.plan.warmup + 1 if self.plan.interval > 1 else 1

    def wants_probe(self, unit: UnitSpec) -> bool:
        if self.plan.score == "self_attn":
            return unit.name == "attn"  # each block's main attention is the s1 source
        return unit.kind == "cross"

    # --- when to compute everything -------------------------------------------------------------

    def begin(self, run: DiffusionRun) -> None:
        run.store["layers_full"] = {}
        if not self.config.reference_compat:
            run.store["full"] = self._decide(run, update=True)
            run.count("full_steps" if run.store["full"] else "partial_steps")

    def _is_full(self, run: DiffusionRun, layer: int) -> bool:
        store = run.store
        if not self.config.reference_compat:
            return store["full"]
        decided = store["layers_full"]
        if layer not in decided:  # the reference decides per block; only block 0's full step refreshes N_eff
            decided[layer] = self._decide(run, update=layer == 0)
            if layer == 0:
                run.count("full_steps" if decided[0] else "partial_steps")
        return decided[layer]

    def _decide(self, run: DiffusionRun, update: bool) -> bool:
        plan, call, store = self.plan, run.call, run.store
        if plan.interval == 1:
            return True
        if plan.full_rule == "every":
            return every(call.step, plan.interval, plan.warmup)
        index = call.num_steps - 1 - call.step if plan.full_rule == "dit" else call.step
        full = call.step == 0 or index % store.setdefault("interval", plan.interval) == 0
        if full and update:
            store["interval"] = next_interval(plan.full_rule, plan.interval, index, call.num_steps)
        return full

    def ratio(self, run: DiffusionRun, call: UnitCall) -> float:
        """rho for this unit at this step (D1.5), clamped to [0, 1]."""
        plan, block, step = self.plan, call.block, run.call
        depth = 27 if self.config.reference_compat else max(block.group_size - 1, 1)
        x_step = 0.0
        if plan.step_weight:
            x_step = ((step.num_steps - 1 - step.step) if plan.backward_steps else step.step) / step.num_steps
        module = {"self": plan.self_factor, "joint": plan.self_factor, "cross": plan.cross_factor, "mlp": plan.mlp_factor}[call.unit.kind]
        rho = plan.fresh_ratio * ramp(plan.layer_weight, block.index / depth) * ramp(plan.step_weight, x_step) * module
        return min(max(rho * self.groups.get(block.group, 1.0), 0.0), 1.0)

    # --- one unit call -------------------------------------------------------------------------

    def unit(self, run: DiffusionRun, call: UnitCall) -> Any:
        store = run.store
        if self._is_full(run, call.block.layer) or call.key not in store:
            return self._compute_all(run, call)
        rho = self.ratio(run, call)
        if call.unit.kind in ("self", "joint"):
            return self._compute_all(run, call) if rho >= 1.0 else store[call.key]
        n = call.x.shape[1]
        fresh = int(rho * n)
        if fresh >= n:
            run.count("refreshed_tokens", call.x.shape[0] * n)
            return self._compute_all(run, call)
        counter = store[("stale", *call.key)]
        if fresh > 0:
            rows = top_rows(self._score(run, call, counter), fresh)
            values = self._compute(run, call, rows)
            scatter_rows(store[call.key], rows, values)
            counter += 1
            counter.scatter_(1, rows, 0)
            run.count("refreshed_tokens", rows.numel())
        else:
            counter += 1
        return store[call.key]

    def _compute_all(self, run: DiffusionRun, call: UnitCall) -> Any:
        store = run.store
        store[call.key] = self._compute(run, call, None)
        if call.unit.kind in ("cross", "mlp"):
            store[("stale", *call.key)] = torch.zeros(call.x.shape[:2], dtype=torch.int32, device=call.x.device)
        return store[call.key]

    def _compute(self, run: DiffusionRun, call: UnitCall, rows: torch.Tensor | None) -> Any:
        """Run the unit on all rows or on ``rows``; refresh the score maps from its q / k when it is a score source."""
        if call.probe is None:
            return call.compute(rows)
        with call.probe.capture():
            out = call.compute(rows)
        q, k, segments = call.probe.qk(call.kwargs)
        run.count("flops_computed", 2 * q.numel() * k.shape[-2])  # the probe's Q K^T (s1 and s2 alike)
        if call.unit.kind == "cross":
            self._update_cross_map(run, call, cross_attention_probs(q, k, call.kwargs.get("attention_mask")), rows)
        else:
            received = attention_received(q, k, q.shape[-1] ** -0.5, chunk=PROBE_CHUNK)
            run.store[("s1", call.block.layer)] = {stream: received[:, part] for stream, part in segments.items()}
        return out

    def _update_cross_map(self, run: DiffusionRun, call: UnitCall, probs: torch.Tensor, rows: torch.Tensor | None) -> None:
        """s2's map c-bar (D1.4): stored at full steps, fresh rows updated in place; CFG halves averaged when shared."""
        probs = self._share(run, probs)
        key = ("s2", call.block.layer)
        if rows is None:
            run.store[key] = probs
        else:
            scatter_rows(run.store[key], rows, probs)

    def _share(self, run: DiffusionRun, values: torch.Tensor) -> torch.Tensor:
        """Average the two halves of a CFG-doubled batch and tile the mean back to both (the reference's c-bar)."""
        if not (self.plan.shared and run.call.pairs):
            return values
        half = values.shape[0] // 2
        mean = (values[:half] + values[half:]) / 2
        return torch.cat([mean, mean])

    def _base_score(self, run: DiffusionRun, call: UnitCall) -> torch.Tensor:
        """s1 or s2 (D1.4), L2-normalised over the tokens: [B, N] float32."""
        maps = run.store
        if self.plan.score == "cross_entropy":
            return l2_normalize(1.0 + entropy(maps[("s2", call.block.layer)]))
        return l2_normalize(maps[("s1", call.block.layer)][call.unit.stream])

    def _score(self, run: DiffusionRun, call: UnitCall, counter: torch.Tensor) -> torch.Tensor:
        """S = s_base + lambda_3 * s3, then the s4 bonus (D1.4), per sample: [B, N] float32."""
        plan = self.plan
        n = call.x.shape[1]
        score = self._share(run, self._base_score(run, call) + self.config.soft_fresh_weight * counter.float() / plan.interval)
        grid = run.call.grid
        if plan.spatial_cell and call.unit.stream == "img" and grid[0] * grid[1] == n:
            score = cell_bonus(score, grid, plan.spatial_cell, plan.spatial_bonus)
        return score
