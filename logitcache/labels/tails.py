"""Tail rules: how a format-2 row's recorded rest mass (outside top-k ∪ {target}) is spread over the other classes.

Every loss reads the teacher through `TopKLogits.log_probs` / `teacher_log_probs`, which call the group's rule
here, so the rule has one home. Selected per dump (``dump --tail NAME``) and recorded in the group metadata
(``GroupMeta.tail``, `TailRule.to_json`).

``uniform``  the rest spread evenly over the unknown classes, each capped at the k-th top-k probability (format 1's
             rule, with the rest mass recorded instead of derived). 0 bytes per view.
``prior``    the rest spread in proportion to a class-conditional mean tail: ``prior[c]`` is the teacher's mean
             probability of each class *when it is outside the known classes*, over calibration views whose
             top-1 class is c (C × C float32, stored once per group). A row uses the mixture
             ``Σ_i p_i · prior[c_i]`` over its top-k classes (measured better than the top-1 row alone), raised to
             1/T at temperature T, capped like ``uniform``. 0 bytes per view.
``sampled``  m classes drawn with replacement from the proposal q_j = ½ (p_j / rest_1 + p_j^Tq / rest_Tq), the
             mean of the teacher's tail distributions at T = 1 and at the highest recorded temperature Tq (so the
             weights stay below 2 · rest / m at both), stored with their T = 1 log-probabilities. Each draw of
             class j carries the importance weight ``p_j^T / (m q_j)``, so E[p̂_j^T] = p_j^T at every recorded
             temperature and the KD/DKD/NKD
             gradients (linear in the teacher probabilities once the target's and the known mass are fixed) are
             unbiased (Anshumann et al., ACL 2025, "Sparse Logit Sampling"). Classes not drawn get TAIL_FLOOR.
             NKD and DKD renormalise the non-target mass of the row: with ONE recorded temperature every draw
             weighs rest / m, the drawn mass equals the recorded rest and they stay unbiased; with several, the
             T = 1 weights vary and the renormalisation makes them ratio estimators with an O(1/m) bias
             (measured: `fidelity.expected_gradient`, README "Storage frontier").
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import torch
from torch import Tensor

#: smallest probability a tail class gets (keeps log-probabilities finite; contributes < 1e-9 in total at C=1000).
TAIL_FLOOR = 1e-12
TAIL_NAMES = ("uniform", "prior", "sampled")


class TailRule:
    """Base class; a rule is shared by every row of a group and compares by `key`."""

    name = "base"
    per_row = False  # True when each row carries data for the rule (tail_indices / tail_logprobs)

    @property
    def key(self) -> str:
        return self.name

    def __eq__(self, other) -> bool:
        return isinstance(other, TailRule) and self.key == other.key

    def __hash__(self) -> int:
        return hash(self.key)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.key})"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name}

    def check(self, tk) -> None:
        """Shape checks against a `TopKLogits` (ValueError)."""

    def fill(self, tk, temperature: float, log_rest: Tensor, known: Tensor, kth: Tensor) -> Tensor:
        """(N, C) float64 log-probabilities for the unknown classes (known columns are overwritten later)."""
        raise NotImplementedError


def _capped_log(p: Tensor, kth: Tensor) -> Tensor:
    lp = torch.where(p > 0, torch.log(p.clamp(min=1e-300)), torch.full_like(p, math.log(TAIL_FLOOR)))
    return torch.minimum(lp, kth[:, None])


class UniformTail(TailRule):
    name = "uniform"

    def fill(self, tk, temperature, log_rest, known, kth):
        n_tail = (~known).sum(1, keepdim=True)
        rest = log_rest.exp()[:, None] / n_tail.clamp(min=1)
        return _capped_log(rest, kth).expand(-1, known.shape[1]).clone()


class PriorTail(TailRule):
    name = "prior"

    def __init__(self, prior: Tensor, digest: str | None = None, prior_views: int | None = None):
        if prior.dim() != 2 or prior.shape[0] != prior.shape[1]:
            raise ValueError(f"a class prior is (C, C), got {tuple(prior.shape)}")
        p = prior.detach().float()
        if not torch.isfinite(p).all() or (p < 0).any():
            raise ValueError("a class prior must be finite and >= 0")
        self.prior = p
        self.digest = prior_digest(p)
        if digest is not None and digest != self.digest:
            raise ValueError(f"class prior digest {self.digest[:16]}… != the recorded {str(digest)[:16]}…")
        self.prior_views = prior_views
        self._on: dict[str, Tensor] = {}

    @property
    def key(self) -> str:
        return f"prior:{self.digest}"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "prior_views": self.prior_views}

    def check(self, tk) -> None:
        if self.prior.shape[0] != tk.num_classes:
            raise ValueError(f"class prior is {tuple(self.prior.shape)}, rows have {tk.num_classes} classes")

    def on(self, device) -> Tensor:
        key = str(device)
        if key not in self._on:
            self._on[key] = self.prior.to(device)
        return self._on[key]

    def fill(self, tk, temperature, log_rest, known, kth):
        p1 = tk.topk_log_probs(1.0).exp()  # (N, k) mixture weights
        w = torch.einsum("nk,nkc->nc", p1, self.on(tk.indices.device)[tk.indices]).double()
        w = w.masked_fill(known, 0.0).clamp(min=0.0)
        if temperature != 1.0:
            w = w.pow(1.0 / temperature)
        total = w.sum(1, keepdim=True)
        n_tail = (~known).sum(1, keepdim=True).clamp(min=1)
        # a row whose prior has no mass on its unknown classes falls back to uniform
        shape = torch.where(total > 0, w / total.clamp(min=1e-300), (~known).double() / n_tail)
        return _capped_log(shape * log_rest.exp()[:, None], kth)


class SampledTail(TailRule):
    name = "sampled"
    per_row = True

    def __init__(self, m: int):
        if int(m) < 1:
            raise ValueError(f"the sampled tail needs m >= 1 classes, got {m}")
        self.m = int(m)

    @property
    def key(self) -> str:
        return f"sampled:{self.m}"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "m": self.m}

    def check(self, tk) -> None:
        if tk.tail_indices is None or tk.tail_indices.shape[1] != self.m:
            raise ValueError(f"the sampled tail needs tail_indices/tail_logprobs with m={self.m} columns")

    def draw(self, z: Tensor, unknown: Tensor, tq: float, generator: torch.Generator | None) -> Tensor:
        """(N, m) classes drawn with replacement from each row's proposal (``z``: the dense logits)."""
        q = torch.zeros_like(z, dtype=torch.float64)
        for t in {1.0, float(tq)}:
            p = torch.softmax(z.double() / t, dim=1).masked_fill(~unknown, 0.0)
            q += p / p.sum(1, keepdim=True).clamp(min=1e-300)
        empty = q.sum(1, keepdim=True) <= 0  # nothing left (k + target = C): any class, its weight is 0
        q = torch.where(empty, torch.ones_like(q), q)
        return torch.multinomial(q, self.m, replacement=True, generator=generator)

    @staticmethod
    def proposal_log(tk) -> Tensor:
        """(N, m) log q_j of each stored draw (the proposal above, from what a row stores)."""
        tq = max(tk.temperatures)
        z = tk.tail_logprobs.double() + tk.lse_at(1.0).double()[:, None]  # logits up to a per-row constant
        parts = []
        for t in sorted({1.0, float(tq)}):
            lp = z / t - tk.lse_at(t).double()[:, None]
            parts.append(lp - tk.log_rest[:, tk._temperature_column(t)].double()[:, None])
        lq = torch.logsumexp(torch.stack(parts), dim=0)
        return lq - math.log(len(parts))

    def fill(self, tk, temperature, log_rest, known, kth):
        z = tk.tail_logprobs.double() + tk.lse_at(1.0).double()[:, None]
        lp_t = z / temperature - tk.lse_at(temperature).double()[:, None]
        w = torch.exp(lp_t - self.proposal_log(tk)) / self.m
        p = torch.zeros(known.shape, dtype=torch.float64, device=known.device)
        p.scatter_add_(1, tk.tail_indices, w)
        return torch.log(p.clamp(min=TAIL_FLOOR))


UNIFORM = UniformTail()


def prior_digest(prior: Tensor) -> str:
    return hashlib.sha256(prior.detach().float().contiguous().cpu().numpy().tobytes()).hexdigest()


def tail_settings(spec: str, *, prior_views: int) -> dict[str, Any]:
    """The group-metadata form of a ``--tail`` value (what a rerun must match)."""
    name, m = parse_tail(spec)
    return {"name": name, **({"m": m} if name == "sampled" else {}),
            **({"prior_views": int(prior_views)} if name == "prior" else {})}


def tail_from_settings(d: dict[str, Any] | None, prior: Tensor | None = None, digest: str | None = None) -> TailRule:
    """The rule a group's ``tail`` metadata names (``prior``: with its matrix, checked against ``digest``)."""
    name = (d or {}).get("name", "uniform")
    if name == "uniform":
        return UNIFORM
    if name == "sampled":
        return SampledTail(int(d["m"]))
    if name == "prior":
        if prior is None:
            raise ValueError("tail 'prior' needs the group's class prior")
        return PriorTail(prior, digest=digest, prior_views=d.get("prior_views"))
    raise ValueError(f"unknown tail rule {name!r} (this logitcache knows {', '.join(TAIL_NAMES)})")


def parse_tail(spec: str) -> tuple[str, int]:
    """``uniform`` | ``prior`` | ``sampled`` | ``sampled:M`` -> (name, m); ValueError otherwise."""
    name, _, arg = str(spec).partition(":")
    if name not in TAIL_NAMES:
        raise ValueError(f"unknown tail {spec!r}: one of {', '.join(TAIL_NAMES)} (sampled:M for M classes)")
    if name != "sampled" and arg:
        raise ValueError(f"tail {name!r} takes no argument")
    m = 0
    if name == "sampled":
        try:
            m = int(arg) if arg else 8
        except ValueError:
            raise ValueError(f"sampled tail: M must be an integer, got {arg!r}") from None
        if m < 1:
            raise ValueError("sampled tail: M must be >= 1")
    return name, m


class PriorAccumulator:
    """Sums for the ``prior`` rule over calibration views: for each top-1 class c and class j, the teacher's mean
    T = 1 probability of j over the views with top-1 c where j is outside top-k ∪ {target}.

    Sums are fixed-point integers (2^-40), so the prior does not depend on the order batches arrive in (workers).
    """

    SCALE = 2.0**40

    def __init__(self, num_classes: int):
        self.c = num_classes
        self.sums = torch.zeros(num_classes, num_classes, dtype=torch.int64)
        self.counts = torch.zeros(num_classes, num_classes, dtype=torch.int64)
        self.views = 0

    def add(self, logits: Tensor, indices: Tensor, target: Tensor) -> None:
        z = logits.detach().double().cpu()
        p = torch.softmax(z, dim=1)
        known = torch.zeros_like(p, dtype=torch.bool)
        known.scatter_(1, indices.cpu(), True)
        known.scatter_(1, target.cpu().long()[:, None], True)
        top1 = indices[:, 0].cpu()
        self.sums.index_add_(0, top1, torch.round(p.masked_fill(known, 0.0) * self.SCALE).long())
        self.counts.index_add_(0, top1, (~known).long())
        self.views += z.shape[0]

    def prior(self) -> Tensor:
        """(C, C) float32: per top-1 class the mean tail probability, shrunk toward the all-views mean by one
        pseudo-view (classes never top-1 get the all-views mean)."""
        sums = self.sums.double() / self.SCALE
        counts = self.counts.double()
        overall = sums.sum(0) / counts.sum(0).clamp(min=1)
        return ((sums + overall) / (counts + 1)).float()
