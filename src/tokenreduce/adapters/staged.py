"""Attaching a staged method (METHODS.md sec. 0.3, hook H5): each stage at its own site, one run state for all.

Stages are attached last-first: the adapter wraps model entry points (LLaVA's
``LlavaModel.forward``), so a stage attached later sits *outside* the ones
attached before it and hands them what it produced. With FiCoCo-VL the
vision stage's placeholder shrinker therefore calls the LLM stage's forward
with the already shortened prompt, and the decoder sees the visual tokens that
survived the tower. Undo actions are concatenated in attach order, so ``remove``
(which runs them in reverse) peels the stages off first-attached-last and
restores the model exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..methods.staged import Staged
from .base import Adapter, Undo

PIPELINE_KEYS = ("visual_tokens_in", "visual_tokens_out", "equivalent_tokens")
"""Summary keys lifted to the top of ``stats()``: the first stage's input count, the last stage's output count and
layer-averaged count (the LLM's layers run on what the last stage leaves)."""


@dataclass
class StagedRun:
    """Run states of the stages of one staged method, by stage name in pipeline order."""

    runs: dict[str, Any]

    def stats(self) -> dict[str, Any]:
        """Each stage's stats under its name, plus the pipeline's visual tokens in (first stage) and out (last stage)."""
        stages = [run.stats() for run in self.runs.values()]
        ends = {PIPELINE_KEYS[0]: stages[0], PIPELINE_KEYS[1]: stages[-1], PIPELINE_KEYS[2]: stages[-1]}
        summary = {key: stats[key] for key, stats in ends.items() if key in stats}
        return {**summary, "stages": list(self.runs), **dict(zip(self.runs, stages))}

    def reset(self) -> None:
        for run in self.runs.values():
            run.reset()


def attach_stages(adapter: Adapter, method: Staged) -> tuple[list[Undo], StagedRun]:
    """Attach every stage of ``method`` at its site on ``adapter``, last stage first; one undo list and one run state."""
    undo: list[Undo] = []
    runs: dict[str, Any] = {}
    try:
        for name, (site, stage) in reversed(method.bound.items()):
            adapter.site = site
            stage_undo, runs[name] = adapter.attach(stage)
            undo.extend(stage_undo)
    except Exception:
        for action in reversed(undo):  # a later stage refused: the model is left as it was
            action()
        raise
    return undo, StagedRun({name: runs[name] for name in method.bound})
