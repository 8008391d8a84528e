"""Classification metrics as reported in the PS-KD paper's tables: top-1/top-5, NLL, ECE (15 bins), AURC.

Pure functions of ``scores`` (N, C) and integer ``target`` (N,). ``scores`` are logits unless ``probs=True``
(then rows are probabilities). Everything is computed in float64. All results are fractions / nats per sample;
the papers' tables print ECE x 100 and AURC x 1000.

Definitions (p = softmax(logits), confidence c_n = max_i p_n,i, prediction = argmax, e_n = [prediction != y_n]):

* top-k accuracy: fraction of samples whose target is among the k highest scores. With C < k classes, k is
  taken as C (timm's convention), so top-5 on 3 classes is 1.0.
* NLL: ``mean_n -log p_n,y_n`` (``-log_softmax`` of the logits, never ``log(softmax)``).
* ECE (Naeini et al. 2015; Guo et al. 2017; the PS-KD code's ``calc_ece``): M equal-width bins on the
  confidence, bin m = ((m-1)/M, m/M]; ``ECE = Σ_m |B_m|/N · |acc(B_m) - conf(B_m)|`` over non-empty bins.
* AURC (Geifman et al., ICLR 2019; the PS-KD code's ``calc_aurc_eaurc``): sort samples by confidence,
  highest first; the risk at coverage i/N is the error rate of the i most confident samples;
  ``AURC = (1/N) Σ_{i=1..N} (1/i) Σ_{j<=i} e_(j)``. Equal confidences: the reference code keeps input order,
  which makes AURC depend on sample order (and on how DDP ranks are concatenated); here each run of equal
  confidences contributes its expected value over all orders (its errors spread evenly along the run). With
  distinct confidences both agree exactly.
* E-AURC = AURC - AURC*, with ``AURC* = r + (1 - r) ln(1 - r)`` and r the overall error rate (the continuous
  approximation of the optimal ordering's AURC that Geifman et al. and PS-KD use).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from logitcache.runtime.dist import group_collective_device

__all__ = [
    "ClassificationMetrics",
    "ReliabilityBins",
    "aurc",
    "aurc_from_confidence",
    "confidence_and_correct",
    "ece",
    "ece_from_confidence",
    "eaurc_from_confidence",
    "nll",
    "reliability_bins",
    "reliability_from_confidence",
    "topk_accuracy",
    "topk_correct",
]


def _check(scores: Tensor, target: Tensor) -> None:
    if scores.dim() != 2 or not scores.is_floating_point():
        raise ValueError(f"scores must be a floating (N, C) tensor, got {scores.dtype} of shape {tuple(scores.shape)}")
    if target.dim() != 1 or target.is_floating_point() or target.dtype == torch.bool:
        raise ValueError(f"target must be an integer (N,) tensor, got {target.dtype} of shape {tuple(target.shape)}")
    if target.shape[0] != scores.shape[0]:
        raise ValueError(f"scores have {scores.shape[0]} rows but target has {target.shape[0]}")
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= scores.shape[1]):
        raise ValueError(f"target values must lie in [0, {scores.shape[1]}), got [{int(target.min())}, "
                         f"{int(target.max())}]")


def _probabilities(scores: Tensor, probs: bool) -> Tensor:
    scores = scores.detach().double()
    return scores if probs else torch.softmax(scores, dim=1)


def topk_correct(scores: Tensor, target: Tensor, k: int) -> Tensor:
    """(N,) bool: is the target among the ``min(k, C)`` highest scores."""
    _check(scores, target)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    top = scores.detach().topk(min(k, scores.shape[1]), dim=1).indices
    return (top == target.unsqueeze(1)).any(dim=1)


def topk_accuracy(scores: Tensor, target: Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """``{k: top-k accuracy}`` (fractions); k > C counts as k = C. NaN for N = 0."""
    n = target.shape[0]
    return {k: (topk_correct(scores, target, k).double().sum().item() / n if n else float("nan")) for k in ks}


def _per_sample_nll(scores: Tensor, target: Tensor, probs: bool) -> Tensor:
    scores = scores.detach().double()
    log_p = scores.clamp_min(0).log() if probs else torch.log_softmax(scores, dim=1)
    return -log_p.gather(1, target.long().unsqueeze(1)).squeeze(1)


def nll(scores: Tensor, target: Tensor, *, probs: bool = False) -> float:
    """Mean negative log-likelihood of the targets, in nats (inf where a given probability is 0)."""
    _check(scores, target)
    return _per_sample_nll(scores, target, probs).mean().item() if target.numel() else float("nan")


def confidence_and_correct(scores: Tensor, target: Tensor, *, probs: bool = False) -> tuple[Tensor, Tensor]:
    """(N,) float64 confidence = max probability, and (N,) bool: is the argmax the target."""
    _check(scores, target)
    confidence, prediction = _probabilities(scores, probs).max(dim=1)
    return confidence, prediction == target


@dataclass(frozen=True)
class ReliabilityBins:
    """Equal-width confidence bins: bin m covers (edges[m], edges[m+1]].

    ``confidence`` / ``accuracy`` are per-bin means (NaN for an empty bin), ``count`` the samples per bin.
    """

    edges: Tensor  # (M + 1,) float64, 0 .. 1
    confidence: Tensor  # (M,) float64
    accuracy: Tensor  # (M,) float64
    count: Tensor  # (M,) int64

    @property
    def ece(self) -> float:
        """``Σ_m |B_m|/N · |acc(B_m) - conf(B_m)|`` over the non-empty bins (NaN when there are no samples)."""
        n = int(self.count.sum())
        if n == 0:
            return float("nan")
        full = self.count > 0
        gap = (self.accuracy[full] - self.confidence[full]).abs()
        return (gap * self.count[full].double()).sum().item() / n

    def to_dict(self) -> dict[str, list]:
        """Plain lists (NaN for empty bins) for JSON and plotting."""
        return {
            "edges": self.edges.tolist(),
            "confidence": self.confidence.tolist(),
            "accuracy": self.accuracy.tolist(),
            "count": self.count.tolist(),
        }


def reliability_from_confidence(confidence: Tensor, correct: Tensor, n_bins: int = 15) -> ReliabilityBins:
    """`ReliabilityBins` from per-sample confidences in [0, 1] and correctness."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    if confidence.shape != correct.shape or confidence.dim() != 1:
        raise ValueError(f"confidence {tuple(confidence.shape)} and correct {tuple(correct.shape)} must be (N,)")
    confidence = confidence.detach().double().cpu()
    correct = correct.detach().double().cpu()
    if confidence.numel() and (confidence.min() < -1e-6 or confidence.max() > 1 + 1e-6):
        raise ValueError(f"confidences must lie in [0, 1], got [{confidence.min():.6g}, {confidence.max():.6g}]; "
                         f"pass probs=False for logits")
    confidence = confidence.clamp(0.0, 1.0)
    edges = torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64)
    # bucketize(right=False) gives i with edges[i] < c <= edges[i+1] over the inner edges: bins closed on the right
    index = torch.bucketize(confidence, edges[1:-1], right=False)
    count = torch.bincount(index, minlength=n_bins)
    sum_conf = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, index, confidence)
    sum_acc = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, index, correct)
    denom = count.double()
    nan = torch.full((n_bins,), float("nan"), dtype=torch.float64)
    return ReliabilityBins(
        edges=edges,
        confidence=torch.where(count > 0, sum_conf / denom.clamp_min(1), nan),
        accuracy=torch.where(count > 0, sum_acc / denom.clamp_min(1), nan),
        count=count,
    )


def reliability_bins(scores: Tensor, target: Tensor, n_bins: int = 15, *, probs: bool = False) -> ReliabilityBins:
    """Per-bin mean confidence, accuracy and count of the max-probability prediction (reliability diagram)."""
    return reliability_from_confidence(*confidence_and_correct(scores, target, probs=probs), n_bins=n_bins)


def ece_from_confidence(confidence: Tensor, correct: Tensor, n_bins: int = 15) -> float:
    return reliability_from_confidence(confidence, correct, n_bins).ece


def ece(scores: Tensor, target: Tensor, n_bins: int = 15, *, probs: bool = False) -> float:
    """Expected calibration error with `n_bins` equal-width bins (a fraction; the PS-KD tables print x 100)."""
    return reliability_bins(scores, target, n_bins, probs=probs).ece


def aurc_from_confidence(confidence: Tensor, correct: Tensor) -> float:
    """Area under the risk-coverage curve (module docstring), ties taken at their expected value."""
    if confidence.shape != correct.shape or confidence.dim() != 1:
        raise ValueError(f"confidence {tuple(confidence.shape)} and correct {tuple(correct.shape)} must be (N,)")
    n = confidence.numel()
    if n == 0:
        return float("nan")
    confidence = confidence.detach().double().cpu()
    sorted_conf, order = torch.sort(confidence, descending=True, stable=True)
    errors = (~correct.detach().cpu().bool()[order]).double()
    # runs of equal confidence: within a run, errors are spread evenly (the mean over all orders of the run)
    _, run_length = torch.unique_consecutive(sorted_conf, return_counts=True)
    run_id = torch.repeat_interleave(torch.arange(run_length.numel()), run_length)
    run_errors = torch.zeros(run_length.numel(), dtype=torch.float64).index_add_(0, run_id, errors)
    run_end = torch.cumsum(run_length, 0)
    run_start = run_end - run_length
    errors_before_run = torch.cumsum(run_errors, 0) - run_errors
    position = torch.arange(1, n + 1, dtype=torch.float64)  # i = 1 .. N, the coverage is i / N
    within = (position - run_start[run_id].double()) * run_errors[run_id] / run_length[run_id].double()
    risk = (errors_before_run[run_id] + within) / position
    return risk.mean().item()


def eaurc_from_confidence(confidence: Tensor, correct: Tensor) -> float:
    """Excess AURC: AURC minus ``r + (1 - r) ln(1 - r)``, r the error rate."""
    if correct.numel() == 0:
        return float("nan")
    r = torch.tensor(1.0 - correct.detach().double().mean().item(), dtype=torch.float64)
    optimal = r + torch.xlogy(1 - r, 1 - r)  # xlogy: 0 · log 0 = 0 when every prediction is wrong
    return aurc_from_confidence(confidence, correct) - optimal.item()


def aurc(scores: Tensor, target: Tensor, *, probs: bool = False) -> float:
    """AURC with confidence = max probability (a fraction; the PS-KD tables print x 1000)."""
    return aurc_from_confidence(*confidence_and_correct(scores, target, probs=probs))


class ClassificationMetrics:
    """Streaming top-1/top-k, NLL, ECE and AURC over many batches, mergeable across DDP ranks.

    ECE and AURC need every sample's confidence, so the accumulator keeps four per-sample values (the state):
    ``confidence`` (float64), ``correct1`` and ``correctk`` (bool), ``nll`` (float64): 18 bytes per sample,
    ~0.9 MB for ImageNet's 50,000 validation images, ~23 MB for its 1.28 M training images. Tensors stay on
    the device they came from until `compute`.

    DDP: ``metrics.gather().compute()`` on every rank (all ranks must call `gather`); or move `state()` yourself
    and rebuild with `from_state` / `merge`. A `DistributedSampler` that pads the last batch repeats samples; drop
    them before `update` for exact figures.
    """

    STATE_KEYS = ("confidence", "correct1", "correctk", "nll")

    def __init__(self, *, n_bins: int = 15, topk: int = 5):
        if n_bins < 1 or topk < 1:
            raise ValueError(f"n_bins and topk must be >= 1, got {n_bins}, {topk}")
        self.n_bins, self.topk = n_bins, topk
        self._parts: dict[str, list[Tensor]] = {key: [] for key in self.STATE_KEYS}

    def __len__(self) -> int:
        return sum(t.numel() for t in self._parts["confidence"])

    def reset(self) -> None:
        self._parts = {key: [] for key in self.STATE_KEYS}

    def update(self, scores: Tensor, target: Tensor, *, probs: bool = False) -> None:
        """Add a batch: (N, C) logits (probabilities with ``probs=True``) and (N,) integer targets."""
        confidence, correct1 = confidence_and_correct(scores, target, probs=probs)
        self._append(
            confidence=confidence,
            correct1=correct1,
            correctk=topk_correct(scores, target, self.topk),
            nll=_per_sample_nll(scores, target, probs),
        )

    def _append(self, **values: Tensor) -> None:
        shapes = {tuple(v.shape) for v in values.values()}
        if len(shapes) != 1 or len(next(iter(shapes))) != 1:
            raise ValueError(f"state tensors must be (N,) and of one length, got shapes {sorted(shapes)}")
        for key in self.STATE_KEYS:
            dtype = torch.bool if key.startswith("correct") else torch.float64
            self._parts[key].append(values[key].detach().to(dtype))

    def state(self) -> dict[str, Tensor]:
        """The per-sample state, concatenated: ``{key: (N,) tensor}`` for `STATE_KEYS`."""
        out = {}
        for key, parts in self._parts.items():
            dtype = torch.bool if key.startswith("correct") else torch.float64
            out[key] = torch.cat(parts) if parts else torch.zeros(0, dtype=dtype)
        return out

    @classmethod
    def from_state(cls, state: dict[str, Tensor], *, n_bins: int = 15, topk: int = 5) -> ClassificationMetrics:
        missing = [k for k in cls.STATE_KEYS if k not in state]
        if missing:
            raise ValueError(f"metrics state lacks {missing}")
        metrics = cls(n_bins=n_bins, topk=topk)
        metrics._append(**{k: state[k] for k in cls.STATE_KEYS})
        return metrics

    def sorted_by(self, keys: Tensor) -> ClassificationMetrics:
        """A new accumulator holding these samples ordered by ``keys`` (one per sample, in update order), e.g. the
        samples' global indices: the float sums then do not depend on the order the samples were scored in."""
        order = torch.argsort(keys)
        return ClassificationMetrics.from_state({k: v[order.to(v.device)] for k, v in self.state().items()},
                                                n_bins=self.n_bins, topk=self.topk)

    def merge(self, others: ClassificationMetrics | Iterable[ClassificationMetrics]) -> ClassificationMetrics:
        """Append the samples of `others` (same settings) to this accumulator; returns self."""
        for other in [others] if isinstance(others, ClassificationMetrics) else others:
            if (other.n_bins, other.topk) != (self.n_bins, self.topk):
                raise ValueError(f"cannot merge metrics with n_bins/topk {other.n_bins}/{other.topk} into "
                                 f"{self.n_bins}/{self.topk}")
            for key in self.STATE_KEYS:
                self._parts[key].extend(other._parts[key])
        return self

    def gather(self, group=None) -> ClassificationMetrics:
        """Every rank's samples, in rank order, as a new accumulator on every rank (a copy when not distributed).

        Two collectives: the per-rank counts, then the state packed as one (4, max_n) float64 tensor.
        """
        import torch.distributed as dist

        state = self.state()
        if not (dist.is_available() and dist.is_initialized()):
            return ClassificationMetrics.from_state(state, n_bins=self.n_bins, topk=self.topk)
        device = torch.device(group_collective_device(group))  # NCCL: this rank's GPU; gloo: the CPU
        world = dist.get_world_size(group)
        count = torch.tensor([len(self)], dtype=torch.int64, device=device)
        counts = [torch.zeros_like(count) for _ in range(world)]
        dist.all_gather(counts, count, group=group)
        sizes = [int(c) for c in counts]
        packed = torch.zeros(len(self.STATE_KEYS), max(sizes), dtype=torch.float64, device=device)
        for row, key in enumerate(self.STATE_KEYS):
            packed[row, : sizes[dist.get_rank(group)]] = state[key].to(device=device, dtype=torch.float64)
        gathered = [torch.empty_like(packed) for _ in range(world)]
        dist.all_gather(gathered, packed, group=group)
        merged = torch.cat([g[:, :size] for g, size in zip(gathered, sizes, strict=True)], dim=1)
        return ClassificationMetrics.from_state(
            {key: (merged[row] > 0.5 if key.startswith("correct") else merged[row]) for row, key in
             enumerate(self.STATE_KEYS)},
            n_bins=self.n_bins,
            topk=self.topk,
        )

    def reliability(self) -> ReliabilityBins:
        state = self.state()
        return reliability_from_confidence(state["confidence"], state["correct1"], self.n_bins)

    def compute(self) -> dict[str, float | int]:
        """``{"top1", "top<k>", "nll", "ece", "aurc", "eaurc": fractions / nats, "n": samples}`` (NaN when n = 0)."""
        state = {key: value.cpu() for key, value in self.state().items()}
        n = state["confidence"].numel()
        if n == 0:
            nan = float("nan")
            return {"top1": nan, f"top{self.topk}": nan, "nll": nan, "ece": nan, "aurc": nan, "eaurc": nan, "n": 0}
        confidence, correct = state["confidence"], state["correct1"]
        return {
            "top1": correct.double().mean().item(),
            f"top{self.topk}": state["correctk"].double().mean().item(),
            "nll": state["nll"].mean().item(),
            "ece": ece_from_confidence(confidence, correct, self.n_bins),
            "aurc": aurc_from_confidence(confidence, correct),
            "eaurc": eaurc_from_confidence(confidence, correct),
            "n": n,
        }
