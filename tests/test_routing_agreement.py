"""Routing agreement without replay (routing/agreement.py) against hand-computed counts."""

from __future__ import annotations

import torch

from sapo_megatron.routing import agreement_counts, counts_to_metrics


def test_counts_match_a_hand_count():
    # Two samples, 2 MoE layers, top-2. Rows are tokens; the mask drops row 0 of sample 0.
    eng0 = torch.tensor([[[0, 1], [2, 3]], [[0, 1], [2, 3]], [[4, 5], [6, 7]]], dtype=torch.uint8)
    live0 = torch.tensor([[[7, 6], [5, 4]],   # masked out: never counted
                          [[1, 0], [3, 2]],   # same sets (order ignored) in both layers
                          [[4, 6], [6, 7]]])  # layer 0 differs
    eng1 = torch.tensor([[[1, 2], [3, 4]], [[5, 6], [7, 0]]], dtype=torch.uint8)
    live1 = torch.tensor([[[1, 2], [3, 5]],   # layer 1 differs
                          [[5, 7], [7, 1]]])  # both differ
    masks = [torch.tensor([False, True, True]), torch.tensor([True, True])]
    agree, tokens, differ = agreement_counts([eng0, eng1], [live0, live1], masks, [0, 1])
    # 4 counted tokens. Layer 0 agrees on rows (0,1) and (1,0): 2/4; layer 1 on (0,1), (0,2): 2/4.
    assert agree.tolist() == [2.0, 2.0] and tokens.tolist() == [4.0, 4.0]
    assert differ.tolist() == [False, True, True, True]
    m = counts_to_metrics(agree, tokens, float(differ.sum()), float(differ.numel()))
    assert m == {"routing/live_agreement_moe0": 0.5, "routing/live_agreement_moe1": 0.5,
                 "routing/live_agreement_mean": 0.5, "routing/live_token_differ_frac": 0.75}


def test_a_pipeline_stage_counts_only_its_layers():
    eng = torch.tensor([[[0, 1], [2, 3]]])
    live = torch.tensor([[[0, 1], [9, 9]]])  # layer 1 "differs" but belongs to another stage
    agree, tokens, differ = agreement_counts([eng], [live], [torch.tensor([True])], [0])
    assert agree.tolist() == [1.0, 0.0] and tokens.tolist() == [1.0, 0.0] and differ.tolist() == [False]
    # Guard: counting both layers sees the difference.
    assert agreement_counts([eng], [live], [torch.tensor([True])], [0, 1])[2].tolist() == [True]
    assert "routing/live_agreement_moe1" not in counts_to_metrics(agree, tokens, 0.0, 1.0)
