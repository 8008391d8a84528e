"""The losses: hand-derived values, gradients (gradcheck), extremes, dtypes, sparse teachers, the name table.

Reference-code comparisons live in test_losses_refcheck.py.
"""

from __future__ import annotations

import inspect
import math
import warnings

import pytest
import torch

from logitcache.errors import TemperatureNotRecorded
from logitcache.labels.topk import TopKLogits
from logitcache.losses import (
    LOSSES,
    cross_entropy,
    dkd,
    dkd_terms,
    get_loss,
    kd,
    keyword_parameters,
    label_smoothing,
    nkd,
    nkd_terms,
    parse_loss_args,
    pskd,
    pskd_alpha,
    tf_kd,
    tf_nkd,
    tf_nkd_terms,
    uskd,
    uskd_terms,
    zipf_ls,
)
from logitcache.losses.zipf_ls import competition_rank

CLI_NAMES = {"ce", "ls", "kd", "dkd", "nkd", "tf-kd", "zipf-ls", "tf-nkd", "pskd", "uskd"}


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _batch(n: int = 4, c: int = 7, seed: int = 0, dtype=torch.float32):
    g = _gen(seed)
    student = (torch.randn(n, c, generator=g) * 2).to(dtype)
    teacher = (torch.randn(n, c, generator=g) * 2).to(dtype)
    weak = torch.randn(n, c, generator=g).to(dtype)
    target = torch.randint(0, c, (n,), generator=g)
    return student, teacher, weak, target


def _mixed_labels(n: int, c: int, seed: int = 1) -> torch.Tensor:
    g = _gen(seed)
    a, b = torch.randint(0, c, (n,), generator=g), torch.randint(0, c, (n,), generator=g)
    b = torch.where(a == b, (a + 1) % c, b)
    lam = torch.rand(n, 1, generator=g) * 0.4 + 0.55
    return lam * torch.nn.functional.one_hot(a, c) + (1 - lam) * torch.nn.functional.one_hot(b, c)


# one callable per loss with its extra inputs, used by the generic tests
def _all_losses(student, teacher, weak, target, prev, votes):
    return {
        "ce": lambda s: cross_entropy(s, target),
        "ls": lambda s: label_smoothing(s, target, epsilon=0.1),
        "kd": lambda s: kd(s, teacher, temperature=4.0),
        "dkd": lambda s: dkd(s, teacher, target, alpha=1.0, beta=8.0, temperature=4.0),
        "nkd": lambda s: nkd(s, teacher, target, gamma=1.5, temperature=2.0),
        "tf-kd": lambda s: tf_kd(s, target),
        "zipf-ls": lambda s: zipf_ls(s, target),
        "zipf-ls-votes": lambda s: zipf_ls(s, target, votes=votes),
        "tf-nkd": lambda s: tf_nkd(s, target),
        "pskd": lambda s: pskd(s, target, prev, alpha_t=0.4),
        "uskd-paper": lambda s: uskd(s, weak, target, rank="paper"),
        "uskd-official": lambda s: uskd(s, weak, target, rank="official"),
    }


LOSS_NAMES = list(_all_losses(*[None] * 6))


def _inputs(n, c, seed=0, dtype=torch.float32):
    student, teacher, weak, target = _batch(n, c, seed, dtype)
    prev = torch.softmax(torch.randn(n, c, generator=_gen(seed + 7)), dim=1).to(dtype)
    votes = torch.randint(0, c, (n, 9), generator=_gen(seed + 8))
    return student, teacher, weak, target, prev, votes


# ============================================================================ hand-derived values
def test_kd_is_ce_form_of_eq_2_3_minus_teacher_entropy():
    """kd/T² + H(p_T) = −T_t log S_t − Σ_{i≠t} T_i log S_i (NKD paper Eq. 2–3, at temperature T)."""
    student, teacher, _, target = _batch(3, 5, seed=3, dtype=torch.float64)
    temp = 2.0
    value = kd(student, teacher, temperature=temp) / temp**2
    for_rows = []
    for n in range(3):
        z_s = [float(v) / temp for v in student[n]]
        z_t = [float(v) / temp for v in teacher[n]]
        lse_s = math.log(sum(math.exp(v) for v in z_s))
        lse_t = math.log(sum(math.exp(v) for v in z_t))
        p_t = [math.exp(v - lse_t) for v in z_t]
        log_s = [v - lse_s for v in z_s]
        t = int(target[n])
        entropy = -sum(p * math.log(p) for p in p_t)
        ce_form = -p_t[t] * log_s[t] - sum(p_t[i] * log_s[i] for i in range(5) if i != t)  # Eq. 3
        for_rows.append((ce_form, entropy))
    expected = sum(ce - h for ce, h in for_rows) / 3
    assert float(value) == pytest.approx(expected, rel=1e-6)
    assert float(value) > 0
    assert float(kd(teacher, teacher, temperature=temp)) == pytest.approx(0.0, abs=1e-6)


def test_dkd_tckd_nckd_split_by_hand_and_kd_identity():
    """TCKD = KL([p_t, 1−p_t]), NCKD = KL of the renormalised non-target parts; KD = TCKD + (1 − p_t^T)·NCKD."""
    student = torch.tensor([[1.0, 3.0, -1.0, 0.5]], dtype=torch.float64)
    teacher = torch.tensor([[0.0, 4.0, 1.0, -2.0]], dtype=torch.float64)
    target = torch.tensor([1])
    temp = 2.0
    terms = dkd_terms(student, teacher, target, alpha=1.0, beta=1.0, temperature=temp)
    ps = [math.exp(v / temp) for v in student[0].tolist()]
    pt = [math.exp(v / temp) for v in teacher[0].tolist()]
    ps = [v / sum(ps) for v in ps]
    pt = [v / sum(pt) for v in pt]
    bt, bs = [pt[1], 1 - pt[1]], [ps[1], 1 - ps[1]]
    tckd = sum(a * math.log(a / b) for a, b in zip(bt, bs, strict=True))
    nt = [pt[i] / (1 - pt[1]) for i in (0, 2, 3)]
    ns = [ps[i] / (1 - ps[1]) for i in (0, 2, 3)]
    nckd = sum(a * math.log(a / b) for a, b in zip(nt, ns, strict=True))
    assert float(terms["dkd_tckd"]) == pytest.approx(temp**2 * tckd, rel=1e-6)
    assert float(terms["dkd_nckd"]) == pytest.approx(temp**2 * nckd, rel=1e-6)
    # DKD paper Eq. 1: KD = TCKD + (1 − p_t^T) NCKD
    whole = kd(student, teacher, temperature=temp)
    assert float(whole) == pytest.approx(float(terms["dkd_tckd"]) + (1 - pt[1]) * float(terms["dkd_nckd"]), rel=1e-6)
    # α and β scale their own terms only
    scaled = dkd_terms(student, teacher, target, alpha=2.0, beta=0.5, temperature=temp)
    assert float(scaled["dkd_tckd"]) == pytest.approx(2 * float(terms["dkd_tckd"]), rel=1e-9)
    assert float(scaled["dkd_nckd"]) == pytest.approx(0.5 * float(terms["dkd_nckd"]), rel=1e-9)


@pytest.mark.parametrize("lam", [1.0, 2.0])
def test_nkd_with_a_one_hot_teacher_by_hand(lam):
    """Teacher one-hot on the target: T_t = 1 and N(T^λ) uniform, so NKD = CE + γλ²·mean_{i≠t}(−log N(S^λ)_i)."""
    student = torch.tensor([[2.0, 0.0, 1.0]], dtype=torch.float64)
    teacher = torch.tensor([[60.0, 0.0, 0.0]])
    target = torch.tensor([0])
    gamma = 1.5
    terms = nkd_terms(student, teacher, target, gamma=gamma, temperature=lam)
    ce = -(2.0 - math.log(math.e**2 + 1 + math.e))
    # N(S^λ) over classes 1, 2 = softmax([0, 1/λ])
    log_n = [-math.log(1 + math.exp(1 / lam)), 1 / lam - math.log(1 + math.exp(1 / lam))]
    nontarget = gamma * lam**2 * -(0.5 * log_n[0] + 0.5 * log_n[1])
    assert float(terms["nkd_target"]) == pytest.approx(ce, rel=1e-6)
    assert float(terms["nkd_nontarget"]) == pytest.approx(nontarget, rel=1e-6)
    # the same teacher kept as top-1 only: the tail (classes 1, 2) gets the rest mass uniformly — still exact
    sparse = TopKLogits.from_logits(teacher, target, k=1, temperatures=(1.0, lam))
    sparse_value = nkd(student, sparse, target, gamma=gamma, temperature=lam)
    assert float(sparse_value) == pytest.approx(ce + nontarget, rel=1e-6)


def test_uskd_soft_target_p_t_by_hand():
    """P_t = S_t² + V_t − mean_batch(S_t²); L_target = −mean P_t log S_t (hard labels)."""
    student = torch.tensor([[0.0, 0.0, 0.0], [math.log(6.0), 0.0, math.log(3.0)]], dtype=torch.float64)
    weak = torch.zeros(2, 3, dtype=torch.float64)
    target = torch.tensor([0, 0])
    s_t = [1 / 3, 0.6]
    mean_sq = (s_t[0] ** 2 + s_t[1] ** 2) / 2
    p_t = [s**2 + 1 - mean_sq for s in s_t]
    expected = -(p_t[0] * math.log(s_t[0]) + p_t[1] * math.log(s_t[1])) / 2
    terms = uskd_terms(student, weak, target, alpha=1.0, beta=0.1, mu=0.005)
    assert float(terms["uskd_target"]) == pytest.approx(expected, rel=1e-9)
    # P_t is not clamped: a confident row gets weight > 1, an unsure one < 1
    assert p_t[1] > 1 > p_t[0]
    # weak term: V' = 0.9·onehot + 0.1/C against uniform W = 1/3 → μ·log 3
    assert float(terms["uskd_weak"]) == pytest.approx(0.005 * math.log(3), rel=1e-9)


def test_uskd_p_t_with_score_labels_by_hand():
    """Two label columns per row: one P_t per column, batch means per column; no non-target class is left."""
    student = torch.tensor([[1.0, 0.0, -1.0], [0.0, 2.0, 0.5]], dtype=torch.float64)
    weak = torch.zeros(2, 3, dtype=torch.float64)
    target = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.4, 0.6]], dtype=torch.float64)
    probs = torch.softmax(student, dim=1).tolist()
    cols = [(0, 1), (2, 1)]  # (largest, second) label column per row
    vals = [(0.7, 0.3), (0.6, 0.4)]
    total = 0.0
    for k in range(2):
        sq = [probs[n][cols[n][k]] ** 2 for n in range(2)]
        mean = sum(sq) / 2
        for n in range(2):
            total += -(sq[n] + vals[n][k] - mean) * math.log(probs[n][cols[n][k]])
    terms = uskd_terms(student, weak, target, alpha=1.0, beta=1.0, mu=1.0)
    assert float(terms["uskd_target"]) == pytest.approx(total / 2, rel=1e-9)
    # one non-target column per row: its normalised probability is 1, so L_non = 0
    assert float(terms["uskd_nontarget"]) == pytest.approx(0.0, abs=1e-12)
    smooth = 0.9 * target + 0.1 / 3
    assert float(terms["uskd_weak"]) == pytest.approx(float((smooth * math.log(3)).sum(1).mean()), rel=1e-9)


@pytest.mark.parametrize("rank,zipf", [("paper", [6 / 13, 4 / 13, 3 / 13]), ("official", [4 / 13, 6 / 13, 3 / 13])])
def test_uskd_zipf_labels_by_hand(rank, zipf):
    """C=4, target 0. Eq. 10 ranks classes (0, 1, 2, 3); the released log-probability score ranks (0, 2, 1, 3).

    paper:    W/(1−W_0) on non-targets = softmax([2, 0, 1]) = (.665, .090, .245), S/(1−S_0) = (.245, .665, .090)
              → R = (1.898, .910, .755, .335)
    official: W/(1−W_0+1e-6) = (.090, .665, .090, .245), log S/(1−log S_0) = (−.306, −1.694, −1.000, −2.389)
              → R = (−.216, −1.029, −.910, −2.144)
    Zipf values 1/(p+1) by rank position, target dropped, renormalised → ``zipf`` for classes 1, 2, 3.
    """
    student = torch.tensor([[3.0, 1.0, 2.0, 0.0]], dtype=torch.float64)
    weak = torch.tensor([[0.0, 2.0, 0.0, 1.0]], dtype=torch.float64)
    target = torch.tensor([0])
    terms = uskd_terms(student, weak, target, alpha=1.0, beta=1.0, mu=1.0, rank=rank)
    log_n = torch.log_softmax(student[0, 1:], dim=0).tolist()
    expected = -sum(z * ls for z, ls in zip(zipf, log_n, strict=True))
    assert float(terms["uskd_nontarget"]) == pytest.approx(expected, rel=1e-9)


def test_uskd_weak_term_trains_the_weak_head_only_through_l_weak():
    student, _, weak, target = _batch(4, 6, seed=5)
    weak = weak.clone().requires_grad_(True)
    student = student.clone().requires_grad_(True)
    terms = uskd_terms(student, weak, target, mu=0.1)
    terms["uskd_weak"].backward(retain_graph=True)
    assert weak.grad is not None and weak.grad.abs().sum() > 0
    # the ranking uses the weak logits without gradient: target + non-target terms leave the weak head alone
    weak.grad = None
    (terms["uskd_target"] + terms["uskd_nontarget"]).backward()
    assert weak.grad is None or float(weak.grad.abs().sum()) == 0.0


def test_competition_rank_and_zipf_ls_with_votes_by_hand():
    assert competition_rank(torch.tensor([[4.0, 3.0, 3.0, 2.0, 1.0]])).tolist() == [[1, 2, 2, 4, 5]]
    # votes: class 2 ×3, classes 0 and 4 ×2, class 1 ×1, classes 3 and 5 ×0 → "min" ranks (2, 4, 1, 5, 2, 5)
    votes = torch.tensor([[2, 2, 2, 0, 0, 4, 4, 1]])
    student = torch.tensor([[0.5, -1.0, 2.0, 0.0, 1.0, 0.3]], dtype=torch.float64)
    target = torch.tensor([2])
    ranks = {0: 2, 1: 4, 3: 5, 4: 2, 5: 5}
    raw = {i: 1 / r for i, r in ranks.items()}
    z = {i: v / sum(raw.values()) for i, v in raw.items()}
    others = [0, 1, 3, 4, 5]
    log_n = dict(zip(others, torch.log_softmax(student[0, others], dim=0).tolist(), strict=True))
    expected = sum(z[i] * (math.log(z[i]) - log_n[i]) for i in others)
    assert float(zipf_ls(student, target, votes=votes)) == pytest.approx(expected, rel=1e-9)
    # without votes the detached logits rank: (0.5, −1, [2], 0, 1, 0.3) → ranks of non-targets 3, 6, 5, 2, 4
    ranks = {0: 3, 1: 6, 3: 5, 4: 2, 5: 4}
    raw = {i: 1 / r for i, r in ranks.items()}
    z = {i: v / sum(raw.values()) for i, v in raw.items()}
    expected = sum(z[i] * (math.log(z[i]) - log_n[i]) for i in others)
    assert float(zipf_ls(student, target)) == pytest.approx(expected, rel=1e-9)


def test_tf_nkd_pure_row_in_a_mixed_batch_by_hand():
    """A row with one non-zero score has weight 0 on its second column and is left out of that column's mean."""
    student = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 2.0], [0.5, 0.5, 0.0]], dtype=torch.float64)
    target = torch.tensor([[0.6, 0.4, 0.0], [0.0, 0.0, 1.0], [0.3, 0.0, 0.7]], dtype=torch.float64)
    p = torch.softmax(student, dim=1).tolist()
    first = [(0, 0.6), (2, 1.0), (2, 0.7)]
    second = [(1, 0.4), None, (0, 0.3)]
    mean1 = sum(p[n][c] for n, (c, _) in enumerate(first)) / 3
    t1 = -sum((p[n][c] + v - mean1) * math.log(p[n][c]) for n, (c, v) in enumerate(first)) / 3
    rows2 = [(n, cv) for n, cv in enumerate(second) if cv is not None]
    mean2 = sum(p[n][c] for n, (c, _) in rows2) / 2
    t2 = -sum((p[n][c] + v - mean2) * math.log(p[n][c]) for n, (c, v) in rows2) / 3
    terms = tf_nkd_terms(student, target)
    assert float(terms["tf_nkd"]) == pytest.approx(t1, rel=1e-9)
    assert float(terms["tf_nkd_second"]) == pytest.approx(t2, rel=1e-9)


def test_tf_kd_matches_the_released_kldiv_mean_form():
    student, _, _, target = _batch(5, 8, seed=2, dtype=torch.float64)
    u = torch.full((5, 8), 0.01 / 7, dtype=torch.float64).scatter_(1, target[:, None], 0.99)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # KLDivLoss warns that 'mean' divides by N·C — that is the point
        released = torch.nn.KLDivLoss()(torch.log_softmax(student, 1), torch.softmax(u / 20.0, 1)) * 100.0
    assert float(tf_kd(student, target)) == pytest.approx(float(released), rel=1e-9)
    soft = torch.nn.functional.one_hot(target, 8).double()
    assert float(tf_kd(student, soft)) == pytest.approx(float(released), rel=1e-9)


def test_label_smoothing_is_torch_convention_and_pskd_schedule():
    student, _, _, target = _batch(6, 5, seed=4, dtype=torch.float64)
    torch_ls = torch.nn.functional.cross_entropy(student, target, label_smoothing=0.2)
    assert float(label_smoothing(student, target, epsilon=0.2)) == pytest.approx(float(torch_ls), rel=1e-9)
    scores = _mixed_labels(6, 5).double()
    torch_ls = torch.nn.functional.cross_entropy(student, scores, label_smoothing=0.1)
    assert float(label_smoothing(student, scores)) == pytest.approx(float(torch_ls), rel=1e-9)

    assert pskd_alpha(0, 300, 0.8) == pytest.approx(0.8 / 300)
    assert pskd_alpha(299, 300, 0.8) == pytest.approx(0.8)
    ce = torch.nn.functional.cross_entropy(student, target)
    assert float(pskd(student, target, None, alpha_t=0.5)) == pytest.approx(float(ce), rel=1e-9)
    prev = torch.softmax(torch.randn(6, 5, generator=_gen(9), dtype=torch.float64), dim=1)
    soft = 0.7 * torch.nn.functional.one_hot(target, 5).double() + 0.3 * prev
    expected = torch.nn.functional.cross_entropy(student, soft)
    assert float(pskd(student, target, prev, alpha_t=0.3)) == pytest.approx(float(expected), rel=1e-9)


# ============================================================================ gradients, extremes, dtypes
# tf-NKD's weight and USKD's P_t / Zipf labels are detached functions of the student logits, so a finite
# difference in the student sees a derivative the methods cut off on purpose; those two are checked against
# the analytic gradient with the detached parts frozen (below), and USKD by gradcheck in its weak logits.
GRADCHECK_NAMES = [n for n in LOSS_NAMES if n != "tf-nkd" and not n.startswith("uskd")]


@pytest.mark.parametrize("name", GRADCHECK_NAMES)
def test_gradcheck_float64(name):
    student, teacher, weak, target, prev, votes = _inputs(3, 5, seed=11, dtype=torch.float64)
    fn = _all_losses(student, teacher, weak, target, prev, votes)[name]
    x = student.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("rank", ["paper", "official"])
def test_uskd_gradcheck_in_the_weak_logits(rank):
    student, _, weak, target, _, _ = _inputs(3, 5, seed=12, dtype=torch.float64)
    w = weak.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda w: uskd(student, w, target, mu=0.3, rank=rank), (w,), eps=1e-6)


def _frozen_weight_grad(probs: torch.Tensor, columns: list[list[int]], weights: list[list[float]]) -> torch.Tensor:
    """∂/∂s of −(1/N) Σ_n Σ_k w_nk log S_n,c_nk with the weights held fixed: −(1/N) Σ_k w_nk (e_c_nk − S_n)."""
    n, c = probs.shape
    grad = torch.zeros(n, c, dtype=torch.float64)
    for row in range(n):
        for col, w in zip(columns[row], weights[row], strict=True):
            grad[row] -= w * (torch.nn.functional.one_hot(torch.tensor(col), c).double() - probs[row]) / n
    return grad


def test_tf_nkd_and_uskd_target_gradients_with_detached_weights():
    student, _, weak, target, _, _ = _inputs(4, 6, seed=13, dtype=torch.float64)
    probs = torch.softmax(student, dim=1)
    s_t = probs.gather(1, target[:, None])[:, 0]
    cols = [[int(t)] for t in target]

    x = student.clone().requires_grad_(True)
    tf_nkd(x, target).backward()
    weights = [[float(v)] for v in s_t + 1 - s_t.mean()]
    torch.testing.assert_close(x.grad, _frozen_weight_grad(probs, cols, weights))

    x = student.clone().requires_grad_(True)
    uskd_terms(x, weak, target, alpha=1.0, beta=0.0, mu=0.0)["uskd_target"].backward()
    weights = [[float(v)] for v in s_t**2 + 1 - (s_t**2).mean()]
    torch.testing.assert_close(x.grad, _frozen_weight_grad(probs, cols, weights))

    # non-target term: −(1/N) Σ_{i≠t} z_i log N(S)_i has gradient −(z − N(S))/N on the non-target columns
    x = student.clone().requires_grad_(True)
    uskd_terms(x, weak, target, alpha=0.0, beta=1.0, mu=0.0, rank="paper")["uskd_nontarget"].backward()
    for row in range(4):
        t = int(target[row])
        others = [i for i in range(6) if i != t]
        w_n = torch.softmax(weak[row, others], 0)
        s_n = torch.softmax(student[row, others], 0)
        # Eq. 10: R = W/(1−W_t) + S/(1−S_t) over all classes, the target included
        r_t = float(torch.softmax(weak[row], 0)[t] / (1 - torch.softmax(weak[row], 0)[t]) + s_t[row] / (1 - s_t[row]))
        scores = {i: float(w_n[j] + s_n[j]) for j, i in enumerate(others)} | {t: r_t}
        order = sorted(scores, key=lambda i: -scores[i])
        z = torch.tensor([1.0 / (order.index(i) + 1) for i in others], dtype=torch.float64)
        z = z / z.sum()
        expected = torch.zeros(6, dtype=torch.float64)
        expected[others] = -(z - s_n) / 4
        torch.testing.assert_close(x.grad[row], expected)


def _extreme_inputs(kind: str):
    g = _gen(21)
    if kind == "pm100":  # ±100 logits, the student confidently wrong on every row
        n, c = 4, 10
        target = torch.randint(0, c, (n,), generator=g)
        wrong = (target + 1) % c
        student = torch.full((n, c), -100.0).scatter_(1, wrong[:, None], 100.0)
        teacher = torch.full((n, c), -100.0).scatter_(1, target[:, None], 100.0)
        weak = -student
    elif kind == "equal":
        n, c = 4, 10
        target = torch.randint(0, c, (n,), generator=g)
        student, teacher, weak = torch.full((n, c), 3.0), torch.full((n, c), -1.5), torch.zeros(n, c)
    elif kind == "c2":
        n, c = 5, 2
        student, teacher, weak, target = _batch(n, c, seed=22)
        student = student * 40
    else:  # "n1"
        n, c = 1, 6
        student, teacher, weak, target = _batch(n, c, seed=23)
    prev = torch.softmax(teacher, dim=1)
    votes = torch.randint(0, c, (n, 4), generator=g)
    return student, teacher, weak, target, prev, votes


@pytest.mark.parametrize("kind", ["pm100", "equal", "c2", "n1"])
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_finite_values_and_gradients_at_extremes(name, kind):
    student, teacher, weak, target, prev, votes = _extreme_inputs(kind)
    for teacher_form in (teacher, TopKLogits.from_logits(teacher, target, k=1, temperatures=(1.0, 2.0, 4.0))):
        fn = _all_losses(student, teacher_form, weak, target, prev, votes)[name]
        x = student.clone().requires_grad_(True)
        value = fn(x)
        value.backward()
        assert value.dim() == 0 and torch.isfinite(value), f"{name} {kind}: {value}"
        assert torch.isfinite(x.grad).all(), f"{name} {kind}: grad {x.grad}"


@pytest.mark.parametrize("kind", ["pm100", "equal", "c2", "n1"])
def test_finite_uskd_with_score_labels_at_extremes(kind):
    student, _, weak, target, _, _ = _extreme_inputs(kind)
    n, c = student.shape
    scores = 0.6 * torch.nn.functional.one_hot(target, c) + 0.4 * torch.nn.functional.one_hot((target + 1) % c, c)
    for rank in ("paper", "official"):
        x, w = student.clone().requires_grad_(True), weak.clone().requires_grad_(True)
        value = uskd(x, w, scores.float(), rank=rank) + tf_nkd(x, scores.float())
        value.backward()
        assert torch.isfinite(value) and torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_half_inputs_are_computed_in_float32(name, dtype):
    student, teacher, weak, target, prev, votes = _inputs(4, 9, seed=31, dtype=dtype)
    # the same (rounded) numbers in float32 are the reference
    ref_inputs = [t.float() if t.is_floating_point() else t for t in (student, teacher, weak, target, prev, votes)]
    x = student.clone().requires_grad_(True)
    value = _all_losses(student, teacher, weak, target, prev, votes)[name](x)
    value.backward()
    expected = _all_losses(*ref_inputs)[name](ref_inputs[0])
    assert value.dtype == torch.float32
    assert x.grad.dtype == dtype and torch.isfinite(x.grad.float()).all()
    torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-6)


def test_score_labels_for_every_loss_that_takes_a_target():
    student, teacher, weak, target = _batch(6, 8, seed=41)
    scores = _mixed_labels(6, 8)
    hard = scores.argmax(1)
    # NKD, DKD and Zipf's LS use the argmax class of score labels
    assert float(nkd(student, teacher, scores)) == pytest.approx(float(nkd(student, teacher, hard)), rel=1e-6)
    assert float(dkd(student, teacher, scores, alpha=1, beta=2, temperature=2)) == pytest.approx(
        float(dkd(student, teacher, hard, alpha=1, beta=2, temperature=2)), rel=1e-6
    )
    assert float(zipf_ls(student, scores)) == pytest.approx(float(zipf_ls(student, hard)), rel=1e-6)
    # one-hot scores are the hard labels for every loss
    one_hot = torch.nn.functional.one_hot(target, 8).float()
    for name in ("ce", "ls", "tf-kd", "pskd", "uskd-paper", "uskd-official", "tf-nkd"):
        prev = torch.softmax(teacher, 1)
        a = _all_losses(student, teacher, weak, target, prev, None)[name](student)
        b = _all_losses(student, teacher, weak, one_hot, prev, None)[name](student)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


def test_bad_arguments_raise_value_errors():
    student, teacher, weak, target = _batch(3, 5)
    with pytest.raises(ValueError, match="temperature"):
        kd(student, teacher, temperature=0.0)
    with pytest.raises(ValueError, match="do not match"):
        kd(student, teacher[:, :4], temperature=1.0)
    with pytest.raises(ValueError, match="hard labels"):
        nkd(student, teacher, torch.tensor([0, 1, 5]))
    with pytest.raises(ValueError, match="rank"):
        uskd(student, weak, target, rank="fast")
    with pytest.raises(ValueError, match="weak"):
        uskd(student, weak[:, :3], target)
    with pytest.raises(ValueError, match="votes"):
        zipf_ls(student, target, votes=torch.full((3, 4), 9))


# ============================================================================ sparse (TopKLogits) teachers
@pytest.mark.parametrize("temp", [1.0, 4.0])
def test_topk_teacher_with_k_equal_c_matches_dense(temp):
    student, teacher, _, target = _batch(8, 50, seed=51)
    teacher = teacher * 3
    sparse = TopKLogits.from_logits(teacher, target, k=50, temperatures=(1.0, temp))
    cases = {
        "kd": lambda t, s: kd(s, t, temperature=temp),
        "dkd": lambda t, s: dkd(s, t, target, alpha=1.0, beta=8.0, temperature=temp),
        "nkd": lambda t, s: nkd(s, t, target, gamma=1.5, temperature=temp),
    }
    for name, fn in cases.items():
        xs = [student.clone().requires_grad_(True) for _ in range(2)]
        dense_value, sparse_value = fn(teacher, xs[0]), fn(sparse, xs[1])
        dense_value.backward()
        sparse_value.backward()
        torch.testing.assert_close(sparse_value, dense_value, rtol=1e-5, atol=0, msg=name)
        scale = float(xs[0].grad.abs().max())
        torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=1e-5, atol=1e-5 * scale, msg=name)


def _tail_rule_log_probs(teacher: torch.Tensor, target: torch.Tensor, k: int, temp: float) -> torch.Tensor:
    """The documented tail rule, by hand: exact p at the top-k and the target; the rest spread uniformly."""
    n, c = teacher.shape
    out = torch.empty(n, c, dtype=torch.float64)
    for row in range(n):
        z = teacher[row].double() / temp
        p = torch.softmax(z, dim=0)
        known = set(torch.topk(teacher[row], k).indices.tolist()) | {int(target[row])}
        rest = (1.0 - sum(float(p[i]) for i in known)) / (c - len(known))
        for i in range(c):
            out[row, i] = math.log(float(p[i])) if i in known else math.log(rest)
    return out


def test_topk_teacher_with_k_below_c_follows_the_tail_rule():
    student, teacher, _, target = _batch(5, 12, seed=61, dtype=torch.float64)
    target[0] = int(teacher[0].argmin())  # one row whose target lies outside the top-k
    k, temp = 3, 2.0
    sparse = TopKLogits.from_logits(teacher, target, k=k, temperatures=(1.0, temp))
    lp_t = _tail_rule_log_probs(teacher, target, k, temp)
    lp_1 = _tail_rule_log_probs(teacher, target, k, 1.0)
    # a dense teacher whose logits / T are those log-probabilities has exactly that distribution at T
    as_logits_t, as_logits_1 = lp_t * temp, lp_1
    rtol = 1e-5
    assert float(kd(student, sparse, temperature=temp)) == pytest.approx(
        float(kd(student, as_logits_t, temperature=temp)), rel=rtol
    )
    assert float(dkd(student, sparse, target, alpha=1, beta=2, temperature=temp)) == pytest.approx(
        float(dkd(student, as_logits_t, target, alpha=1, beta=2, temperature=temp)), rel=rtol
    )
    terms = nkd_terms(student, sparse, target, temperature=temp)
    expected_target = nkd_terms(student, as_logits_1, target)["nkd_target"]
    assert float(terms["nkd_target"]) == pytest.approx(float(expected_target), rel=rtol)
    expected_non = nkd_terms(student, as_logits_t, target, temperature=temp)["nkd_nontarget"]
    assert float(terms["nkd_nontarget"]) == pytest.approx(float(expected_non), rel=rtol)
    # and it is not the dense teacher (the tail is flattened)
    assert abs(float(kd(student, sparse, temperature=temp)) - float(kd(student, teacher, temperature=temp))) > 1e-3


def test_unrecorded_temperature_is_an_error():
    student, teacher, _, target = _batch(2, 6)
    sparse = TopKLogits.from_logits(teacher, target, k=3, temperatures=(1.0, 4.0))
    with pytest.raises(TemperatureNotRecorded):
        kd(student, sparse, temperature=2.0)
    with pytest.raises(TemperatureNotRecorded):
        nkd(student, sparse, target, temperature=3.0)


# ============================================================================ the name table
def test_table_names_and_consistency_with_signatures():
    assert set(LOSSES) == CLI_NAMES
    for name, spec in LOSSES.items():
        assert get_loss(name) is spec and get_loss(name.replace("-", "_")) is spec
        assert spec.replaces_ce == (name in {"ls", "pskd"})
        if spec.fn is None:
            assert name == "ce" and not spec.defaults
            continue
        assert spec.allowed_args() == set(spec.defaults), name
        signature = inspect.signature(spec.fn).parameters
        for key in set(keyword_parameters(spec.fn)) & set(spec.defaults):
            default = signature[key].default
            if default is not inspect.Parameter.empty:
                assert spec.defaults[key] == default, (name, key)
    assert get_loss("label_smoothing").name == "ls"
    with pytest.raises(ValueError, match="unknown loss"):
        get_loss("fitnet")


def test_paper_default_weights():
    weights = {name: (spec.ce_weight, spec.loss_weight) for name, spec in LOSSES.items()}
    assert weights["tf-kd"] == (0.9, 0.1) and weights["kd"] == (0.5, 0.5) and weights["dkd"] == (1.0, 1.0)
    assert dict(LOSSES["dkd"].defaults) == {"alpha": 1.0, "beta": 0.5, "temperature": 1.0, "warmup": 1}
    assert dict(LOSSES["uskd"].defaults) == {"alpha": 1.0, "beta": 0.1, "mu": 0.005, "rank": "paper"}
    assert LOSSES["nkd"].teacher_temperatures({"gamma": 1.5, "temperature": 2.0}) == (1.0, 2.0)
    assert LOSSES["kd"].teacher_temperatures({"temperature": 4.0}) == (4.0,)
    assert LOSSES["uskd"].teacher_temperatures(LOSSES["uskd"].defaults) == ()


def test_parse_loss_args():
    assert parse_loss_args("kd", ["temperature=4"]) == {"temperature": 4.0}
    assert parse_loss_args("dkd", ["beta=8", "warmup=20"])["warmup"] == 20
    assert parse_loss_args("uskd", ["rank=official", "mu=1e-2"]) == {
        "alpha": 1.0, "beta": 0.1, "mu": 0.01, "rank": "official"
    }
    assert parse_loss_args("pskd", {"alpha_T": 0.8}) == {"alpha_T": 0.8}
    with pytest.raises(ValueError, match=r"'nkd'.*'tau'.*gamma, temperature"):
        parse_loss_args("nkd", ["tau=2"])
    with pytest.raises(ValueError, match="allowed: none"):
        parse_loss_args("ce", ["epsilon=0.1"])
    with pytest.raises(ValueError, match="integer"):
        parse_loss_args("dkd", ["warmup=2.5"])
    with pytest.raises(ValueError, match="number"):
        parse_loss_args("kd", ["temperature=hot"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_loss_args("kd", ["temperature"])
    with pytest.raises(ValueError, match="rank"):
        parse_loss_args("uskd", ["rank=fast"])
    with pytest.raises(ValueError, match="alpha_t"):
        parse_loss_args("pskd", ["alpha_t=0.5"])  # the loop computes α_t from α_T


def test_spec_terms_sum_to_the_weighted_objective():
    student, teacher, weak, target = _batch(4, 10, seed=71)
    ce = cross_entropy(student, target)
    terms = LOSSES["kd"].terms(student, target, teacher=teacher)
    assert set(terms) == {"ce", "kd"}
    assert float(sum(terms.values())) == pytest.approx(float(0.5 * ce + 0.5 * kd(student, teacher, temperature=1.0)))
    terms = LOSSES["uskd"].terms(student, target, weak=weak, args=parse_loss_args("uskd", ["rank=official"]))
    assert set(terms) == {"ce", "uskd_target", "uskd_nontarget", "uskd_weak"}
    assert float(sum(terms.values())) == pytest.approx(float(ce + uskd(student, weak, target, rank="official")))
    # DKD warm-up: mdistiller's min(epoch / warmup, 1) with its 1-based epochs
    args = parse_loss_args("dkd", ["warmup=20", "beta=8", "temperature=4"])
    early = LOSSES["dkd"].terms(student, target, teacher=teacher, args=args, epoch=0)
    late = LOSSES["dkd"].terms(student, target, teacher=teacher, args=args, epoch=30)
    assert float(early["dkd_nckd"]) == pytest.approx(float(late["dkd_nckd"]) / 20)
    # PS-KD replaces CE and takes α_t from the schedule
    terms = LOSSES["pskd"].terms(student, target, prev_probs=torch.softmax(teacher, 1), epoch=9, epochs=10)
    assert set(terms) == {"pskd"}
    expected = pskd(student, target, torch.softmax(teacher, 1), alpha_t=0.3)
    assert float(terms["pskd"]) == pytest.approx(float(expected))
    assert set(LOSSES["ce"].terms(student, target)) == {"ce"}
    assert set(LOSSES["ls"].terms(student, target)) == {"ls"}
    zipf = LOSSES["zipf-ls"].terms(student, target, ce_weight=0.0, loss_weight=2.0)
    assert set(zipf) == {"zipf_ls"} and float(zipf["zipf_ls"]) == pytest.approx(2 * float(zipf_ls(student, target)))
    with pytest.raises(ValueError, match="needs 'teacher'"):
        LOSSES["nkd"].terms(student, target)
