"""FiCoCo-VL: FiCoCo-V in the vision tower and FiCoCo-L in the LLM decoder, as one method (arXiv 2411.17686; METHODS.md C6.1).

The reference enables both stages with two module globals (``merge_visual`` for V,
``AT`` for L). Here the two existing methods run unchanged as the stages of a
staged method (:mod:`..staged`): FiCoCo-V at the vision tower's merge slots (hook
H1), FiCoCo-L at the decoder's cuts (H4), so FiCoCo-L scores and merges the
visual tokens FiCoCo-V left, at the placeholder positions of the patches they
came from (positions ``"original"``, DESIGN.md sec. 4.3). With ``positions="compact"``
in both stages (they must agree, :class:`~tokenreduce.methods.staged.StagedConfig`)
the shortened prompt and every cut are numbered contiguously, as the reference's
shorter sequences are (METHODS.md C5.5).

Budget: each stage takes its own explicit settings; the defaults are each card's
(METHODS.md C6.2: V r = 42 per layer from the second half of the tower, L r = 14
per layer after decoder layer 4). The paper's per-TFLOPs V/L split is undocumented
(C6.5, issue #7) and no FLOPs-target solver splits a budget here. FiCoCo-L's
budget (``equivalent_tokens`` included) is solved against the count FiCoCo-V
leaves, when each prompt runs; the vision stage's budget is checked at ``apply``.

``stats()`` holds each stage's report under its name (``vision``: tower and
placeholder counts, ``visual_slots``; ``language``: visual tokens and sequence
length per decoder layer, ``kept``) plus the pipeline's ``visual_tokens_in`` /
``visual_tokens_out``. The ``language`` stage's ``kept`` columns index the prompt
as FiCoCo-V shortened it; ``vision.visual_slots`` maps them back to patches.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...registry import register_method
from ..staged import Staged, StagedConfig
from .language import FiCoCoL, FiCoCoLConfig
from .vision import REFERENCE_R, FiCoCoV, FiCoCoVConfig


@dataclass(frozen=True, kw_only=True)
class FiCoCoVLConfig(StagedConfig):
    """FiCoCo-VL settings: ``vision`` (a :class:`FiCoCoVConfig`) and ``language`` (a :class:`FiCoCoLConfig`)."""

    method = "ficoco_vl"
    vision: FiCoCoVConfig = FiCoCoVConfig(r=REFERENCE_R)
    language: FiCoCoLConfig = FiCoCoLConfig()


@register_method(FiCoCoVLConfig)
class FiCoCoVL(Staged):
    description = "FiCoCo-VL: FiCoCo-V in the vision tower, then FiCoCo-L in the LLM decoder (explicit per-stage settings)"
    stages = {"vision": FiCoCoV, "language": FiCoCoL}
