"""``positions="compact"`` for in-LLM cuts (METHODS.md C2 "Paper vs code / library", C3 step 5, C5.5; convention 0.5.5).

The references build a shorter sequence at each cut and number it 0..L'-1, shifting
decode positions per stage. The oracle here is the stock model run on the survivors
only, with position ids 0..L'-1 and the (cos, sin) its own rotary embedding gives
them; the cache, padding and zero-strength checks are the contract's
(``test_inllm_contract``) with compact configs; Qwen-VL's M-RoPE has no contiguous
re-indexing and refuses the mode.
"""

from __future__ import annotations

import dataclasses

import pytest
import qwen_vl_fixtures as qf
import torch
import vlm_fixtures as vf
from test_inllm_contract import (  # noqa: F401 (fixtures)
    ALL_BATCHES, CASES, LAYERS, MERGING, Batch, assert_detached, check_cached_generate_equals_recomputation,
    check_padded_batch_equals_samples_one_by_one, llava, model, next_model, record_selection, replay_selection, vlm,
)
from torch import nn

import tokenreduce as tr


def compact(case: str, strength: int = 1) -> tr.ReductionConfig:
    """The case's active (1) or zero-strength (0) config with compact positions."""
    return dataclasses.replace(CASES[case][strength], positions="compact")


def survivors_oracle(model: nn.Module, kept: dict[int, list[int]], **inputs: torch.Tensor) -> torch.Tensor:
    """Last-token logits of the stock model whose layers from each cut on run on the survivors alone, numbered 0..L'-1.

    One unpadded sample; ``kept``: cut layer -> original columns of the visual tokens
    kept from it on. Forward pre-hooks on the stock language model's layers gather
    the survivors (every text token and the kept visual ones) from the hidden states
    entering a cut layer, and hand every layer from the first cut on position ids
    0..L'-1, the (cos, sin) ``rotary_emb`` computes for them and no mask (SDPA's
    plain causal attention): the shorter sequence a reference builds.
    """
    language = model.model.language_model
    text = (inputs["input_ids"][0] != vf.IMAGE_TOKEN).nonzero()[:, 0]
    held = torch.arange(inputs["input_ids"].shape[1])  # original columns of the hidden states entering the next layer

    def enter(layer: int, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        nonlocal held
        if layer < min(kept):
            return None
        hidden = args[0] if args else kwargs.pop("hidden_states")
        if layer in kept:
            wanted = torch.cat([text, torch.tensor(kept[layer])]).sort().values
            hidden, held = hidden[:, torch.searchsorted(held, wanted)], wanted
        ids = torch.arange(hidden.shape[1])[None]
        kwargs.update(attention_mask=None, position_ids=ids, position_embeddings=language.rotary_emb(hidden, ids))
        return (hidden, *args[1:]), kwargs

    hooks = [layer.register_forward_pre_hook(lambda _m, a, kw, i=i: enter(i, a, kw), with_kwargs=True)
             for i, layer in enumerate(language.layers)]
    try:
        with torch.no_grad():
            return model(**inputs, use_cache=False).logits[:, -1]
    finally:
        for hook in hooks:
            hook.remove()


def sample_inputs(vlm: Batch, i: int, seed: int) -> dict[str, torch.Tensor]:
    ids, mask = vf.batch([vlm.prompts[i]])
    return {"input_ids": ids, "attention_mask": mask, **vlm.images(seed, [i])}


@pytest.mark.parametrize("case", sorted(set(CASES) - MERGING))
def test_compact_equals_the_stock_model_on_the_survivors_numbered_from_zero(model, llava, case):
    for i in range(len(llava.prompts)):
        inputs = sample_inputs(llava, i, seed=3)
        with tr.apply(model, compact(case)) as handle:
            with torch.no_grad():
                logits = model(**inputs).logits[:, -1]
            kept = {layer: rows[0] for layer, rows in handle.stats()["kept"].items()}
        assert kept and all(len(columns) < vf.IMAGE_TOKENS for columns in kept.values())
        torch.testing.assert_close(logits, survivors_oracle(model, kept, **inputs), rtol=1e-4, atol=1e-5)


@ALL_BATCHES
@pytest.mark.parametrize("case", list(CASES))
def test_cached_generate_equals_recomputation_with_the_same_kept_set(vlm, case):
    check_cached_generate_equals_recomputation(vlm, compact(case))


@ALL_BATCHES
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("case", list(CASES))
def test_padded_batch_equals_samples_one_by_one(vlm, case, side):
    check_padded_batch_equals_samples_one_by_one(vlm, compact(case), side)


@pytest.mark.parametrize("case", list(CASES))
def test_compact_moves_the_survivors_and_zero_strength_is_bit_exact(vlm, case):
    """Same kept set, other positions: the logits change; a config that cuts nothing changes nothing.

    The cut layers' (cos, sin) for unchanged ids would be the model's own values bit
    for bit, so any difference comes from the re-indexing (its size is the oracle's business).
    """
    with tr.apply(vlm.model, compact(case)) as handle:
        recorded = record_selection(handle)
        moved, _ = vlm.run()
    with tr.apply(vlm.model, CASES[case][1]) as handle:
        replay_selection(handle, recorded)
        kept_in_place, _ = vlm.run()
    assert moved.shape == kept_in_place.shape and not torch.equal(moved, kept_in_place)
    with tr.apply(vlm.model, compact(case, strength=0)):
        logits, tokens = vlm.run()
    assert torch.equal(logits, vlm.reference[0]) and torch.equal(tokens, vlm.reference[1])


def test_qwen_vl_refuses_compact_positions_untouched():
    """M-RoPE's (t, h, w) ids cannot be numbered 0..L'-1: the adapter offers only original positions."""
    qwen = qf.qwen2_vl(LAYERS)
    grids = [qf.SQUARE]
    inputs = {**qf.batch([qf.prompt([7], [8, 9], grids)], "left"), **qf.images(grids, 0)}
    with torch.no_grad():
        expected = qwen(**inputs).logits
    with pytest.raises(tr.ConfigError, match=rf"positions='compact' does not apply to {type(qwen).__name__}; accepted here: original"):
        tr.apply(qwen, tr.FastVConfig(keep=40, positions="compact"))
    assert_detached(qwen) and tr.remove(qwen) == 0
    with torch.no_grad():
        assert torch.equal(qwen(**inputs).logits, expected)


def test_ficoco_vl_with_both_stages_compact_generates_as_its_recomputation(llava):
    """The vision stage numbers the prompt it shortened 0..L-1 and the decoder's cuts renumber their survivors: one
    contiguous numbering, which decode steps on the cut cache continue (the stages must agree, ``StagedConfig``)."""
    config = tr.FiCoCoVLConfig(vision=tr.FiCoCoVConfig(keep=40, positions="compact"),
                               language=tr.FiCoCoLConfig(start_layer=0, r=10, positions="compact"))
    check_cached_generate_equals_recomputation(llava, config, stage="language")
