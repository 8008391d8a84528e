"""Metrics: hand-computed values, the PS-KD reference definitions (ported as plain loops), streaming and DDP."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.multiprocessing as mp

from logitcache.eval.metrics import (
    ClassificationMetrics,
    aurc,
    aurc_from_confidence,
    confidence_and_correct,
    ece,
    nll,
    reliability_bins,
    topk_accuracy,
)

# Four samples, three classes (probabilities). Confidences avoid bin edges (multiples of 1/15).
#   sample  probs               target  prediction  confidence  correct  15-bin index
#   0       .90 .05 .05         0       0           .90         yes      13  (.8667, .9333]
#   1       .20 .70 .10         0       1           .70         no       10  (.6667, .7333]
#   2       .08 .30 .62         2       2           .62         yes       9  (.6,    .6667]
#   3       .45 .35 .20         1       0           .45         no        6  (.4,    .4667]
PROBS = torch.tensor(
    [[0.90, 0.05, 0.05], [0.20, 0.70, 0.10], [0.08, 0.30, 0.62], [0.45, 0.35, 0.20]], dtype=torch.float64
)
TARGET = torch.tensor([0, 0, 2, 1])


def _reference_ece(probs: torch.Tensor, target: torch.Tensor, n_bins: int) -> float:
    """PS-KD's calc_ece as a loop: bins (lower, upper] from linspace(0, 1, n_bins + 1)."""
    confidence, prediction = probs.double().max(dim=1)
    correct = (prediction == target).double()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    total = 0.0
    for lower, upper in zip(edges[:-1], edges[1:], strict=True):
        in_bin = (confidence > lower) & (confidence <= upper)
        if in_bin.any():
            share = in_bin.double().mean().item()
            total += abs(confidence[in_bin].mean().item() - correct[in_bin].mean().item()) * share
    return total


def _reference_aurc(confidence: torch.Tensor, correct: torch.Tensor) -> float:
    """PS-KD's calc_aurc_eaurc as a loop: sort by confidence (stable, descending), average the running risk."""
    pairs = sorted(zip(confidence.tolist(), correct.tolist(), strict=True), key=lambda p: p[0], reverse=True)
    errors, risks = 0, []
    for i, (_, ok) in enumerate(pairs, start=1):
        errors += 0 if ok else 1
        risks.append(errors / i)
    return sum(risks) / len(risks)


def test_hand_computed_four_samples():
    logits = PROBS.log()
    assert ece(PROBS, TARGET, probs=True) == pytest.approx((0.10 + 0.70 + 0.38 + 0.45) / 4, abs=1e-12)
    assert ece(logits, TARGET) == pytest.approx(0.4075, abs=1e-12)
    # two bins: (0, .5] holds sample 3; (.5, 1] holds 0, 1, 2 with mean confidence .74 and accuracy 2/3
    assert ece(PROBS, TARGET, n_bins=2, probs=True) == pytest.approx((0.45 + 3 * abs(2 / 3 - 0.74)) / 4, abs=1e-12)
    # risks at coverage 1/4 .. 4/4 (order .90 ok, .70 err, .62 ok, .45 err): 0/1, 1/2, 1/3, 2/4
    assert aurc(PROBS, TARGET, probs=True) == pytest.approx((0 + 1 / 2 + 1 / 3 + 2 / 4) / 4, abs=1e-12)
    assert nll(PROBS, TARGET, probs=True) == pytest.approx(-(math.log(0.9 * 0.2 * 0.62 * 0.35)) / 4, abs=1e-12)
    assert nll(logits, TARGET) == pytest.approx(-(math.log(0.9 * 0.2 * 0.62 * 0.35)) / 4, abs=1e-12)
    # top-2: sample 1's target (.20) and sample 3's (.35) are second; top-5 with 3 classes counts as top-3
    assert topk_accuracy(logits, TARGET, ks=(1, 2, 5)) == {1: 0.5, 2: 1.0, 5: 1.0}


def test_reliability_bins_hand_computed():
    bins = reliability_bins(PROBS, TARGET, probs=True)
    assert bins.count.tolist() == [0] * 6 + [1, 0, 0, 1, 1, 0, 0, 1, 0]
    assert bins.confidence[[6, 9, 10, 13]].tolist() == pytest.approx([0.45, 0.62, 0.70, 0.90])
    assert bins.accuracy[[6, 9, 10, 13]].tolist() == [0.0, 1.0, 0.0, 1.0]
    assert math.isnan(bins.accuracy[0].item()) and math.isnan(bins.confidence[14].item())
    assert bins.edges[0].item() == 0.0 and bins.edges[-1].item() == 1.0 and bins.edges.numel() == 16
    assert bins.ece == pytest.approx(0.4075, abs=1e-12)
    assert set(bins.to_dict()) == {"edges", "confidence", "accuracy", "count"}


def test_bins_are_closed_on_the_right():
    # confidence exactly 0.5 with two bins falls in (0, .5], exactly 1.0 in (.5, 1]
    probs = torch.tensor([[0.5, 0.5], [1.0, 0.0]], dtype=torch.float64)
    bins = reliability_bins(probs, torch.tensor([0, 0]), n_bins=2, probs=True)
    assert bins.count.tolist() == [1, 1]


def test_perfect_classifier_has_zero_ece_and_aurc():
    target = torch.arange(12) % 4
    logits = 100.0 * torch.nn.functional.one_hot(target, 4).float()  # softmax rounds to exactly 1 in float64
    assert ece(logits, target) == pytest.approx(0.0, abs=1e-12)
    assert aurc(logits, target) == 0.0
    assert topk_accuracy(logits, target) == {1: 1.0, 5: 1.0}
    assert nll(logits, target) == pytest.approx(0.0, abs=1e-12)


def test_always_wrong_classifier_has_aurc_one():
    target = torch.zeros(5, dtype=torch.long)
    logits = torch.tensor([[0.0, 3.0, 1.0]]).repeat(5, 1) + torch.arange(5.0).unsqueeze(1) * torch.tensor([0, 1, 0])
    assert aurc(logits, target) == pytest.approx(1.0)
    metrics = ClassificationMetrics()
    metrics.update(logits, target)
    assert metrics.compute()["eaurc"] == pytest.approx(0.0)  # AURC* = 1 when r = 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_the_reference_definitions_on_random_data(seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(300, 10, generator=g) * 3
    target = torch.randint(0, 10, (300,), generator=g)
    probs = torch.softmax(logits.double(), dim=1)
    assert ece(logits, target) == pytest.approx(_reference_ece(probs, target, 15), abs=1e-12)
    confidence, correct = confidence_and_correct(logits, target)
    assert confidence.unique().numel() == 300  # no ties: the tie rule cannot matter
    assert aurc(logits, target) == pytest.approx(_reference_aurc(confidence, correct), abs=1e-12)


def test_aurc_ties_take_their_expected_value_and_ignore_order():
    # 6 equal confidences, 2 errors: every order's expected risk is 2/6 at every coverage
    confidence = torch.full((6,), 0.7, dtype=torch.float64)
    correct = torch.tensor([True, False, True, True, False, True])
    assert aurc_from_confidence(confidence, correct) == pytest.approx(2 / 6)
    for perm in (torch.randperm(6, generator=torch.Generator().manual_seed(s)) for s in range(3)):
        assert aurc_from_confidence(confidence[perm], correct[perm]) == pytest.approx(2 / 6)
    # a tie inside a larger set: the mean of the reference over both orders of the tied pair
    confidence = torch.tensor([0.9, 0.6, 0.6, 0.3], dtype=torch.float64)
    correct = torch.tensor([True, True, False, False])
    swapped = torch.tensor([True, False, True, False])
    expected = (_reference_aurc(confidence, correct) + _reference_aurc(confidence, swapped)) / 2
    assert aurc_from_confidence(confidence, correct) == pytest.approx(expected)


def test_argument_errors():
    with pytest.raises(ValueError, match="target values"):
        ece(PROBS, torch.tensor([0, 1, 2, 3]), probs=True)
    with pytest.raises(ValueError, match="rows"):
        aurc(PROBS, TARGET[:3], probs=True)
    with pytest.raises(ValueError, match="integer"):
        nll(PROBS, TARGET.float(), probs=True)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ece(PROBS * 3, TARGET, probs=True)


def _batches(seed: int, n: int = 200, c: int = 7, batch: int = 32):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=g) * 2
    target = torch.randint(0, c, (n,), generator=g)
    return logits, target, [(logits[i : i + batch], target[i : i + batch]) for i in range(0, n, batch)]


def _expected(logits, target, topk=5):
    return {
        "top1": topk_accuracy(logits, target, (1,))[1],
        f"top{topk}": topk_accuracy(logits, target, (topk,))[topk],
        "nll": nll(logits, target),
        "ece": ece(logits, target),
        "aurc": aurc(logits, target),
        "n": target.numel(),
    }


def _assert_close(got: dict, want: dict):
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key


def test_streaming_equals_the_batch_functions():
    logits, target, batches = _batches(0)
    metrics = ClassificationMetrics()
    for x, y in batches:
        metrics.update(x, y)
    assert len(metrics) == 200
    result = metrics.compute()
    _assert_close(result, _expected(logits, target))
    assert set(result) == {"top1", "top5", "nll", "ece", "aurc", "eaurc", "n"}
    assert metrics.reliability().count.sum().item() == 200
    metrics.reset()
    assert metrics.compute()["n"] == 0 and math.isnan(metrics.compute()["top1"])


def test_merge_and_state_round_trip():
    logits, target, batches = _batches(1)
    parts = [ClassificationMetrics(topk=3) for _ in range(3)]
    for i, (x, y) in enumerate(batches):
        parts[i % 3].update(x, y)
    merged = ClassificationMetrics(topk=3).merge(parts)
    _assert_close(merged.compute(), _expected(logits, target, topk=3))
    rebuilt = ClassificationMetrics.from_state(merged.state(), topk=3)
    assert rebuilt.compute() == merged.compute()
    with pytest.raises(ValueError, match="n_bins/topk"):
        ClassificationMetrics().merge(parts[0])


def _gather_worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        logits, target, batches = _batches(2, n=203)
        metrics = ClassificationMetrics()
        for x, y in batches[rank::world]:  # uneven shares: 4 batches vs 3, the last one short
            metrics.update(x, y)
        result = metrics.gather().compute()
        with open(f"{out_file}.{rank}", "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


def test_gather_across_two_gloo_processes(tmp_path):
    world = 2
    mp.spawn(_gather_worker, args=(world, str(tmp_path / "init"), str(tmp_path / "out")), nprocs=world)
    logits, target, _ = _batches(2, n=203)
    want = _expected(logits, target)
    for rank in range(world):
        got = json.loads((tmp_path / f"out.{rank}").read_text())
        _assert_close(got, want)


def test_gather_without_distributed_is_a_copy():
    logits, target, batches = _batches(3)
    metrics = ClassificationMetrics()
    metrics.update(logits, target)
    assert metrics.gather().compute() == metrics.compute()
