import math

import pytest
import torch

from logitcache.errors import NonFiniteLogitsError, TemperatureNotRecorded
from logitcache.labels.topk import TAIL_FLOOR, TopKLogits, teacher_log_probs


def _logits(n=6, c=12, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g) * scale


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_k_equals_c_reconstructs_the_dense_softmax(temperature):
    z = _logits()
    target = torch.arange(6) % 12
    tk = TopKLogits.from_logits(z, target, k=12, temperatures=(1.0, 4.0))
    dense = torch.log_softmax(z / temperature, dim=1)
    torch.testing.assert_close(tk.log_probs(temperature), dense, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(teacher_log_probs(tk, temperature), teacher_log_probs(z, temperature))


def test_tail_rule_spreads_the_known_remaining_mass_uniformly():
    # hand example: C = 5, k = 2, target outside the top-k
    z = torch.tensor([[4.0, 3.0, 0.0, -1.0, 1.0]])
    target = torch.tensor([3])
    tk = TopKLogits.from_logits(z, target, k=2)
    p = torch.softmax(z.double(), 1)[0]
    known = p[0] + p[1] + p[3]  # top-2 and the target are exact
    tail = (1 - known) / 2  # classes 2 and 4 share the rest
    expected = torch.tensor([p[0], p[1], tail, p[3], tail])
    torch.testing.assert_close(tk.probs(1.0)[0].double(), expected, rtol=1e-6, atol=1e-7)
    assert tk.probs(1.0).sum().item() == pytest.approx(1.0, abs=1e-6)


def test_target_logprob_is_exact_outside_the_topk():
    z = _logits(n=8, c=50, seed=1)
    target = torch.argmin(z, dim=1)  # the teacher is as wrong as it can be
    tk = TopKLogits.from_logits(z, target, k=3)
    assert not (tk.indices == target[:, None]).any()
    exact = torch.log_softmax(z, 1).gather(1, target[:, None])[:, 0]
    torch.testing.assert_close(tk.target_logprob, exact)
    torch.testing.assert_close(tk.log_probs(1.0).gather(1, target[:, None])[:, 0], exact)


def test_target_at_other_temperature_is_exact():
    z = _logits(n=4, c=20, seed=2)
    target = torch.argmin(z, dim=1)
    tk = TopKLogits.from_logits(z, target, k=2, temperatures=(4.0,))
    assert tk.temperatures == (1.0, 4.0)  # T=1 is always recorded (it anchors target_logprob)
    exact = torch.log_softmax(z / 4, 1).gather(1, target[:, None])[:, 0]
    torch.testing.assert_close(tk.target_log_probs(4.0), exact)


def test_unrecorded_temperature_is_an_error():
    tk = TopKLogits.from_logits(_logits(), torch.zeros(6, dtype=torch.long), k=3)
    with pytest.raises(TemperatureNotRecorded, match="temperature 4"):
        tk.log_probs(4.0)


def test_nonfinite_logits_name_the_sample():
    z = _logits()
    z[2, 5] = math.nan
    z[4, 0] = math.inf
    ids = [f"shard-0.tar:key{i}" for i in range(6)]
    with pytest.raises(NonFiniteLogitsError, match=r"key2.*key4"):
        TopKLogits.from_logits(z, torch.zeros(6, dtype=torch.long), k=3, sample_ids=ids)


def test_extreme_logits_stay_finite():
    z = torch.full((3, 10), -100.0)
    z[:, 0] = 100.0
    tk = TopKLogits.from_logits(z, torch.tensor([0, 1, 9]), k=2)
    lp = tk.log_probs(1.0)
    assert torch.isfinite(lp).all()
    assert lp.exp().sum(1).sub(1).abs().max() < 1e-6
    # no mass is left for the tail after rounding: tail classes get min(p_k, TAIL_FLOOR), here p_k = e^-200
    tail = torch.ones(10, dtype=torch.bool)
    tail[[0, 1]] = False
    assert lp[0, tail].max().item() == pytest.approx(-200.0)
    assert lp[0, tail].max().item() <= math.log(TAIL_FLOOR)


def test_all_equal_logits():
    z = torch.zeros(2, 7)
    tk = TopKLogits.from_logits(z, torch.tensor([3, 6]), k=2)
    torch.testing.assert_close(tk.probs(1.0), torch.full((2, 7), 1 / 7))


def test_cat_and_index_round_trip():
    z = _logits(n=6)
    tk = TopKLogits.from_logits(z, torch.arange(6), k=4)
    back = TopKLogits.cat([tk[i] for i in range(6)])
    torch.testing.assert_close(back.log_probs(), tk.log_probs())
    torch.testing.assert_close(tk[[4, 1]].log_probs(), tk.log_probs()[[4, 1]])


def test_invalid_k_and_temperatures():
    z = _logits()
    with pytest.raises(ValueError, match="topk"):
        TopKLogits.from_logits(z, torch.zeros(6, dtype=torch.long), k=13)
    with pytest.raises(ValueError, match="positive"):
        TopKLogits.from_logits(z, torch.zeros(6, dtype=torch.long), k=2, temperatures=(0.0,))


def test_ties_put_the_lower_class_index_first():
    z = torch.tensor([[1.0, 5.0, 5.0, 0.0, 5.0]])
    tk = TopKLogits.from_logits(z, torch.tensor([0]), k=3)
    assert tk.indices.tolist() == [[1, 2, 4]]
