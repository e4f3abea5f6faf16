"""The one sampling rule (lorakit.inference.sampling) against its definition."""

from __future__ import annotations

import torch

from lorakit.inference.sampling import NucleusLogitsProcessor, choose_tokens, new_generator, nucleus_probs


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept, order = nucleus_probs(logits, torch.tensor([1.0]), torch.tensor([0.7]))
    assert order[0].tolist() == [0, 1, 2, 3]
    torch.testing.assert_close(kept[0], torch.tensor([0.5, 0.3, 0.0, 0.0]))  # 0.5 < 0.7 <= 0.8
    kept, _ = nucleus_probs(logits, torch.tensor([1.0]), torch.tensor([5e-324]))  # rounds to 0: still one token
    assert kept[0].tolist()[0] == 0.5 and kept[0, 1:].sum() == 0


def test_rows_draw_from_their_own_distribution_and_seed():
    """Per-row frequencies match softmax(logits / T) within the nucleus; a row's draw depends on its
    own seed only (a neighbour's seed or greediness does not change it)."""
    torch.manual_seed(0)
    logits = torch.randn(3, 6)
    draws = 4000
    gens = [new_generator(0.7, 11, "cpu"), None, new_generator(1.3, 12, "cpu")]
    counts = torch.zeros(3, 6)
    for _ in range(draws):
        tokens = choose_tokens(logits, [0.7, 0.0, 1.3], [1.0, 1.0, 0.9], gens)
        counts[torch.arange(3), tokens] += 1
    assert (counts[1] == torch.nn.functional.one_hot(logits[1].argmax(), 6) * draws).all()  # greedy row
    expected0 = torch.softmax(logits[0] / 0.7, -1)
    assert (counts[0] / draws - expected0).abs().max() < 0.03
    kept, order = nucleus_probs(logits[2:], torch.tensor([1.3]), torch.tensor([0.9]))
    expected2 = torch.zeros(6).scatter_(0, order[0], kept[0] / kept[0].sum())
    assert (counts[2] / draws - expected2).abs().max() < 0.03
    alone = [choose_tokens(logits[:1], [0.7], [1.0], [new_generator(0.7, 5, "cpu")]).item() for _ in range(1)]
    g = new_generator(0.7, 5, "cpu")
    mixed = choose_tokens(logits, [0.7, 0.9, 0.0], [1.0, 1.0, 1.0], [g, new_generator(0.9, 99, "cpu"), None])
    assert mixed[0].item() == alone[0]


def test_logits_processor_is_the_same_distribution():
    torch.manual_seed(1)
    scores = torch.randn(2, 8)
    processed = NucleusLogitsProcessor(0.8, 0.6)(None, scores)
    kept, order = nucleus_probs(scores, torch.full((2,), 0.8), torch.full((2,), 0.6))
    for b in range(2):
        expected = torch.zeros(8).scatter_(0, order[b], kept[b] / kept[b].sum())
        torch.testing.assert_close(torch.softmax(processed[b], -1), expected)
