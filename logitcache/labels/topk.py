"""`TopKLogits`: a teacher's output kept as its top-k logits — the one place for sparse soft-label math.

What is stored per view (all exact up to float32, except what the cache chooses to quantise):
  * ``indices``        (N, k) int64   the k classes with the largest teacher logit, largest first;
  * ``logits``         (N, k) float32 the teacher logits z_i of those classes;
  * ``target``         (N,)   int64   the ground-truth class of the view;
  * ``target_logprob`` (N,)   float32 log p_t = z_t - logsumexp(z), exact also when t is not in the top-k;
  * ``lse``            (N, R) float32 logsumexp(z / T) for each recorded temperature T (R of them; T = 1 always).

From these the teacher distribution at a recorded temperature T is known exactly on the "known" classes:

    log p_i^T = z_i / T - lse_T                     for i in the top-k
    log p_t^T = (target_logprob + lse_1) / T - lse_T  for the target class (z_t = log p_t + lse_1)

**Tail rule** (the same for every loss): the mass not on a known class, ``1 - Σ_known p_i^T``, is spread
uniformly over the ``C - |known|`` other classes. Each tail value is capped at the k-th top-k probability (a
true bound, exceeded only through rounding), and when rounding leaves no mass at all a tail class gets
``min(p_k, TAIL_FLOOR)`` so log-probabilities stay finite. With k = C there is no tail and the reconstruction
is the dense softmax.

**Format 2 rows** also carry ``log_rest`` (N, R): the log of the teacher mass outside top-k ∪ {target} at each
recorded temperature, stored explicitly (derived by subtraction, the rounding of a large top-1 probability would
land in the small tail mass). With it the tail mass is ``exp(log_rest)`` and its *shape* comes from the group's
tail rule (`logitcache.labels.tails`): ``uniform`` (the rule above), ``prior`` (the class-conditional mean tail
recorded once per group) or ``sampled`` (m classes drawn from the teacher's tail with importance weights, so the
reconstruction is unbiased: E[p̂] = p at every recorded temperature).

A temperature that was not recorded is an error (`TemperatureNotRecorded`), never an approximation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from logitcache.errors import NonFiniteLogitsError, TemperatureNotRecorded
from logitcache.labels.tails import TAIL_FLOOR, UNIFORM, TailRule


@dataclass(frozen=True)
class TopKLogits:
    indices: Tensor
    logits: Tensor
    target: Tensor
    target_logprob: Tensor
    lse: Tensor
    temperatures: tuple[float, ...]
    num_classes: int
    #: format 2: (N, R) log of the mass outside top-k ∪ {target} per temperature (-inf: none); None: 1 - known
    log_rest: Tensor | None = None
    #: how the rest is shaped over the unknown classes (shared by all rows)
    tail: TailRule = UNIFORM
    #: the sampled tail's classes (N, m) and their T = 1 log-probabilities (N, m); None for other tails
    tail_indices: Tensor | None = None
    tail_logprobs: Tensor | None = None

    def __post_init__(self) -> None:
        n, k = self.indices.shape
        if self.logits.shape != (n, k):
            raise ValueError(f"logits shape {tuple(self.logits.shape)} != indices shape {(n, k)}")
        if self.target.shape != (n,) or self.target_logprob.shape != (n,):
            raise ValueError("target and target_logprob must be shaped (N,)")
        if self.lse.shape != (n, len(self.temperatures)):
            raise ValueError(f"lse shape {tuple(self.lse.shape)} != (N, {len(self.temperatures)} temperatures)")
        if not any(math.isclose(t, 1.0) for t in self.temperatures):
            raise ValueError("temperature 1.0 must be recorded (it anchors target_logprob)")
        if not 1 <= k <= self.num_classes:
            raise ValueError(f"k={k} must be in [1, num_classes={self.num_classes}]")
        if self.log_rest is not None and self.log_rest.shape != (n, len(self.temperatures)):
            raise ValueError(f"log_rest shape {tuple(self.log_rest.shape)} != (N, {len(self.temperatures)})")
        if (self.tail_indices is None) != (self.tail_logprobs is None) or (
            self.tail_indices is not None and (self.tail_indices.shape[0] != n
                                               or self.tail_indices.shape != self.tail_logprobs.shape)):
            raise ValueError("tail_indices and tail_logprobs must both be given, shaped (N, m)")
        self.tail.check(self)

    # ------------------------------------------------------------------ construction
    @classmethod
    def _trusted(cls, indices, logits, target, target_logprob, lse, temperatures, num_classes, log_rest=None,
                 tail=UNIFORM, tail_indices=None, tail_logprobs=None) -> TopKLogits:
        """Build without the shape checks, for rows sliced from an already checked `TopKLogits` or unit (the
        replay stage builds one row per sample; the checks would cost more than the row)."""
        obj = object.__new__(cls)
        for name, value in (("indices", indices), ("logits", logits), ("target", target),
                            ("target_logprob", target_logprob), ("lse", lse), ("temperatures", temperatures),
                            ("num_classes", num_classes), ("log_rest", log_rest), ("tail", tail),
                            ("tail_indices", tail_indices), ("tail_logprobs", tail_logprobs)):
            object.__setattr__(obj, name, value)
        return obj

    @classmethod
    def from_logits(
        cls,
        logits: Tensor,
        target: Tensor,
        k: int,
        temperatures: tuple[float, ...] | list[float] = (1.0,),
        *,
        sample_ids: list[str] | None = None,
        keep_rest: bool = False,
        tail: TailRule = UNIFORM,
        generator: torch.Generator | None = None,
    ) -> TopKLogits:
        """Keep the top-k of dense teacher ``logits`` (N, C); reductions in float32.

        Non-finite logits raise `NonFiniteLogitsError` naming the rows (``sample_ids[i]`` when given), so a
        broken teacher is never written to a cache. ``keep_rest``: also record ``log_rest`` (what format 2
        stores); ``tail``: a tail rule that needs per-row data (``sampled``) draws it here, from ``generator``.
        """
        z = logits.detach().float()
        bad = ~torch.isfinite(z).all(dim=1)
        if bad.any():
            rows = bad.nonzero().flatten().tolist()
            names = [sample_ids[i] for i in rows] if sample_ids is not None else [f"row {i}" for i in rows]
            raise NonFiniteLogitsError(f"teacher produced NaN/Inf logits for {len(rows)} sample(s): {names[:10]}")
        temps = _normalise_temperatures(temperatures)
        num_classes = z.shape[1]
        if not 1 <= k <= num_classes:
            raise ValueError(f"--topk {k} must be in [1, {num_classes}]")
        # a stable descending sort defines the order of ties (lower class index first) on every device
        values, indices = torch.sort(z, dim=1, descending=True, stable=True)
        values, indices = values[:, :k].contiguous(), indices[:, :k].contiguous()
        lse = torch.stack([torch.logsumexp(z / t, dim=1) for t in temps], dim=1)
        target = target.long().to(z.device)
        target_logprob = z.gather(1, target[:, None])[:, 0] - lse[:, temps.index(1.0)]
        if not (keep_rest or tail.per_row):
            return cls(indices, values, target, target_logprob, lse, temps, num_classes)
        unknown = torch.ones_like(z, dtype=torch.bool)
        unknown.scatter_(1, indices, False)
        unknown.scatter_(1, target[:, None], False)
        log_rest = torch.stack(
            [torch.logsumexp((z / t).masked_fill(~unknown, -math.inf), dim=1) - lse[:, j] for j, t in enumerate(temps)],
            dim=1,
        )
        tail_indices = tail_logprobs = None
        if tail.per_row:
            tail_indices = tail.draw(z, unknown, max(temps), generator)
            tail_logprobs = (z - lse[:, temps.index(1.0), None]).gather(1, tail_indices)
        return cls(indices, values, target, target_logprob, lse, temps, num_classes, log_rest, tail,
                   tail_indices, tail_logprobs)

    # ------------------------------------------------------------------ queries
    @property
    def k(self) -> int:
        return self.indices.shape[1]

    def __len__(self) -> int:
        return self.indices.shape[0]

    def lse_at(self, temperature: float) -> Tensor:
        """logsumexp(z / T) per row; `TemperatureNotRecorded` when T was not recorded."""
        return self.lse[:, self._temperature_column(temperature)]

    def topk_log_probs(self, temperature: float = 1.0) -> Tensor:
        """(N, k) log-probabilities of the top-k classes at ``temperature``."""
        return self.logits / temperature - self.lse_at(temperature)[:, None]

    def target_log_probs(self, temperature: float = 1.0) -> Tensor:
        """(N,) exact log-probability of the target class at ``temperature``."""
        z_t = self.target_logprob + self.lse_at(1.0)
        return z_t / temperature - self.lse_at(temperature)

    def topk_mass(self, temperature: float = 1.0) -> Tensor:
        """(N,) Σ of the top-k probabilities at ``temperature``."""
        return self.topk_log_probs(temperature).exp().sum(dim=1)

    def log_probs(self, temperature: float = 1.0) -> Tensor:
        """Dense (N, C) teacher log-probabilities at ``temperature``, the tail filled by the tail rule."""
        if self.log_rest is not None:
            return self._log_probs_with_rest(temperature)
        n, c = len(self), self.num_classes
        topk_lp = self.topk_log_probs(temperature).double()
        target_lp = self.target_log_probs(temperature).double()
        target_in_topk = (self.indices == self.target[:, None]).any(dim=1)
        # known mass: the top-k plus the target when it lies outside them
        known_mass = topk_lp.exp().sum(1) + torch.where(target_in_topk, 0.0, target_lp.exp())
        n_tail = c - self.k - (~target_in_topk).long()
        # no tail class can be more probable than the k-th top-k class: cap there (only rounding can exceed
        # it); when rounding leaves no mass at all, fall back to min(p_k, TAIL_FLOOR)
        kth = topk_lp[:, -1]
        rest = (1.0 - known_mass) / n_tail.clamp(min=1)
        tail_lp = torch.where(
            rest > 0, torch.log(rest.clamp(min=1e-300)), torch.full_like(rest, math.log(TAIL_FLOOR))
        )
        tail_lp = torch.minimum(tail_lp, kth)
        tail_lp = torch.where(n_tail > 0, tail_lp, torch.zeros_like(tail_lp))
        out = tail_lp[:, None].expand(n, c).clone()
        out.scatter_(1, self.target[:, None], target_lp[:, None])
        out.scatter_(1, self.indices, topk_lp)
        return out.float()

    def _log_probs_with_rest(self, temperature: float) -> Tensor:
        """Format 2: the known classes exact (as stored), the recorded rest shaped by ``self.tail``."""
        n, c = len(self), self.num_classes
        topk_lp = self.topk_log_probs(temperature).double()
        target_lp = self.target_log_probs(temperature).double()
        log_rest = self.log_rest[:, self._temperature_column(temperature)].double()
        known = torch.zeros(n, c, dtype=torch.bool, device=self.indices.device)
        known.scatter_(1, self.indices, True)
        known.scatter_(1, self.target[:, None], True)
        out = self.tail.fill(self, temperature, log_rest, known, topk_lp[:, -1])
        out.scatter_(1, self.target[:, None], target_lp[:, None])
        out.scatter_(1, self.indices, topk_lp)
        return out.float()

    def probs(self, temperature: float = 1.0) -> Tensor:
        return self.log_probs(temperature).exp()

    # ------------------------------------------------------------------ batching
    def __getitem__(self, rows) -> TopKLogits:
        if isinstance(rows, int):
            rows = slice(rows, rows + 1)
        def sl(t):
            return None if t is None else t[rows]

        return TopKLogits(
            self.indices[rows],
            self.logits[rows],
            self.target[rows],
            self.target_logprob[rows],
            self.lse[rows],
            self.temperatures,
            self.num_classes,
            sl(self.log_rest),
            self.tail,
            sl(self.tail_indices),
            sl(self.tail_logprobs),
        )

    @classmethod
    def cat(cls, parts: list[TopKLogits]) -> TopKLogits:
        """Concatenate rows (e.g. a DataLoader batch of single-row items)."""
        first = parts[0]
        for p in parts[1:]:
            if p.temperatures != first.temperatures or p.num_classes != first.num_classes or p.k != first.k:
                raise ValueError("cannot concatenate TopKLogits with different k, temperatures or classes")
            if p.tail != first.tail or (p.log_rest is None) != (first.log_rest is None):
                raise ValueError("cannot concatenate TopKLogits with different tail rules (format 1 and 2 rows?)")

        def cat(name):
            ts = [getattr(p, name) for p in parts]
            return None if ts[0] is None else torch.cat(ts)

        return cls(
            cat("indices"), cat("logits"), cat("target"), cat("target_logprob"), cat("lse"),
            first.temperatures, first.num_classes, cat("log_rest"), first.tail, cat("tail_indices"),
            cat("tail_logprobs"),
        )

    def to(self, device, non_blocking: bool = False) -> TopKLogits:
        def mv(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return TopKLogits(
            mv(self.indices),
            mv(self.logits),
            mv(self.target),
            mv(self.target_logprob),
            mv(self.lse),
            self.temperatures,
            self.num_classes,
            mv(self.log_rest),
            self.tail,
            mv(self.tail_indices),
            mv(self.tail_logprobs),
        )

    # ------------------------------------------------------------------ helpers
    def _temperature_column(self, temperature: float) -> int:
        for j, t in enumerate(self.temperatures):
            if math.isclose(t, float(temperature), rel_tol=1e-6):
                return j
        raise TemperatureNotRecorded(
            f"temperature {temperature} was not recorded in this cache (recorded: {list(self.temperatures)}); "
            "re-dump with --temperatures including it"
        )

def _normalise_temperatures(temperatures) -> tuple[float, ...]:
    temps = [float(t) for t in temperatures]
    if any(not math.isfinite(t) or t <= 0 for t in temps):
        raise ValueError(f"temperatures must be positive and finite, got {temps}")
    if not any(math.isclose(t, 1.0) for t in temps):
        temps = [1.0, *temps]  # T = 1 anchors target_logprob; recording it is always required
    out: list[float] = []
    for t in temps:
        if not any(math.isclose(t, u) for u in out):
            out.append(1.0 if math.isclose(t, 1.0) else t)
    return tuple(out)

def teacher_log_probs(teacher: Tensor | TopKLogits, temperature: float = 1.0) -> Tensor:
    """Dense (N, C) float32 teacher log-probabilities at ``temperature`` from dense logits or a `TopKLogits`.

    Losses call this, so the tail rule lives in exactly one place.
    """
    if isinstance(teacher, TopKLogits):
        return teacher.log_probs(temperature)
    return torch.log_softmax(teacher.detach().float() / temperature, dim=1)
