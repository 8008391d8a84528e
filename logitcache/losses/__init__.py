"""The losses: one module per method (its paper formula in the docstring) and the CLI name → loss table.

Every loss takes raw logits, works in float32 (float64 stays float64) and in log space, and returns a 0-d
batch mean of the method's own term(s) — without the plain CE term, which the training loop adds with
``ce_weight`` — except ``ls`` and ``pskd``, which replace CE. `LossSpec.terms` returns the whole weighted
objective as a dict of named terms (mdistiller style): the loop sums ``terms.values()`` and logs each.

Default weights are the ImageNet settings of each method's paper or released code (CIFAR values in brackets):

| CLI     | function        | CE       | (CE, loss) weights; arguments |
|---------|-----------------|----------|-------------------------------|
| ce      | –               | yes      | (1, –) |
| ls      | label_smoothing | replaces | (–, 1); ε=0.1 |
| kd      | kd              | yes      | (0.5, 0.5); T=1 — mdistiller r34→r18 [(0.1, 0.9), T=4] |
| dkd     | dkd             | yes      | (1, 1); α=1, β=0.5, T=1, warmup=1 — mdistiller r34→r18 [β=8, T=4, warmup=20] |
| nkd     | nkd             | yes      | (1, 1); γ=1.5, λ=1 — NKD paper §4.1 |
| tf-kd   | tf_kd           | yes      | (0.9, 0.1); T=20, correct_prob=0.99, multiplier=100 — Tf-KD_reg as released |
| zipf-ls | zipf_ls         | yes      | (1, 0.1) — released README, λ=0.1 |
| tf-nkd  | tf_nkd          | yes      | (1, 1) — Eq. 8 |
| pskd    | pskd            | replaces | (–, 1); α_T=0.3 — PS-KD supplement Table S2 [α_T=0.8] |
| uskd    | uskd            | yes      | (1, 1); α=1, β=0.1, μ=0.005, rank="paper" — USKD §4.1 [α=0.1, β=0.1, μ=0.1] |
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from torch import Tensor

from logitcache.labels.topk import TopKLogits
from logitcache.losses.ce import cross_entropy
from logitcache.losses.dkd import dkd, dkd_terms
from logitcache.losses.kd import kd
from logitcache.losses.label_smoothing import label_smoothing
from logitcache.losses.nkd import nkd, nkd_terms
from logitcache.losses.pskd import pskd, pskd_alpha
from logitcache.losses.tf_kd import tf_kd
from logitcache.losses.tf_nkd import tf_nkd, tf_nkd_terms
from logitcache.losses.uskd import uskd, uskd_terms
from logitcache.losses.zipf_ls import zipf_ls

#: the inputs a loss can need beyond (student, target); `LossSpec.needs` is a subset
INPUTS = ("teacher", "weak", "prev_probs", "votes")

#: hyper-parameter names the loop uses itself and does not pass to the loss function
_LOOP_ARGS = {"warmup", "alpha_T"}


@dataclass(frozen=True)
class LossSpec:
    """One row of the loss table.

    ``fn`` is the public function; ``terms_fn`` takes the same arguments and returns its named terms.
    ``needs``: inputs the function takes (``"votes"`` is optional for zipf-ls: it falls back to the logits).
    ``defaults``: every hyper-parameter a user may set with ``--loss-arg``, at the method's paper setting;
    most are the function's keyword arguments, ``warmup`` (dkd) and ``alpha_T`` (pskd) are the loop's.
    """

    name: str
    fn: Callable[..., Tensor] | None
    terms_fn: Callable[..., dict[str, Tensor]] | None
    needs: frozenset[str]
    replaces_ce: bool
    ce_weight: float
    loss_weight: float
    defaults: Mapping[str, Any]
    reference: str
    optional: frozenset[str] = field(default_factory=frozenset)

    # ---------------------------------------------------------------- hyper-parameters
    def allowed_args(self) -> frozenset[str]:
        """What ``--loss-arg`` may set: the function's keyword-only parameters, less the inputs (``votes``) and
        what the loop computes (pskd's ``alpha_t``), plus the loop's own knobs (dkd ``warmup``, pskd ``alpha_T``)."""
        if self.fn is None:
            return frozenset()
        params = set(keyword_parameters(self.fn)) - set(INPUTS) - {"alpha_t"}
        return frozenset(params | (set(self.defaults) & _LOOP_ARGS))

    def function_kwargs(self, args: Mapping[str, Any], *, epoch: int = 0, epochs: int = 1) -> dict[str, Any]:
        """The keyword arguments for ``fn`` in a given (0-based) epoch, from validated ``args``."""
        kwargs = {k: v for k, v in args.items() if k not in _LOOP_ARGS}
        if self.name == "pskd":
            kwargs["alpha_t"] = pskd_alpha(epoch, epochs, args["alpha_T"])
        return kwargs

    def warmup_factor(self, args: Mapping[str, Any], *, epoch: int) -> float:
        """DKD's ``min(epoch / warmup, 1)`` with mdistiller's 1-based epoch, i.e. ``(epoch + 1) / warmup`` here."""
        warmup = args.get("warmup", 0) if self.name == "dkd" else 0
        return 1.0 if warmup <= 0 else min((epoch + 1) / warmup, 1.0)

    def teacher_temperatures(self, args: Mapping[str, Any]) -> tuple[float, ...]:
        """Temperatures at which the loss reads the teacher (a cache must have recorded them); () if no teacher."""
        if "teacher" not in self.needs:
            return ()
        t = float(args["temperature"])
        if self.name != "nkd" or math.isclose(t, 1.0):
            return (t,)
        return (1.0, t)  # NKD's target term reads T_t at temperature 1

    # ---------------------------------------------------------------- the objective
    def terms(
        self,
        student: Tensor,
        target: Tensor,
        *,
        args: Mapping[str, Any] | None = None,
        teacher: Tensor | TopKLogits | None = None,
        weak: Tensor | None = None,
        prev_probs: Tensor | None = None,
        votes: Tensor | None = None,
        epoch: int = 0,
        epochs: int = 1,
        ce_weight: float | None = None,
        loss_weight: float | None = None,
    ) -> dict[str, Tensor]:
        """The weighted objective as named terms: ``"ce"`` (ce_weight · CE, when kept and non-zero) and the
        method's terms × loss_weight (× DKD's warm-up factor). ``sum(terms.values())`` is the loss to minimise."""
        args = dict(self.defaults) if args is None else dict(args)
        ce_w = self.ce_weight if ce_weight is None else float(ce_weight)
        loss_w = self.loss_weight if loss_weight is None else float(loss_weight)
        inputs = {"teacher": teacher, "weak": weak, "prev_probs": prev_probs, "votes": votes}
        for need in sorted(self.needs - self.optional - {"prev_probs"}):
            if inputs[need] is None:
                raise ValueError(f"loss {self.name!r} needs {need!r}, which was not given")
        out: dict[str, Tensor] = {}
        if not self.replaces_ce and ce_w != 0.0:
            out["ce"] = ce_w * cross_entropy(student, target)
        if self.fn is None:
            return out
        kwargs = self.function_kwargs(args, epoch=epoch, epochs=epochs)
        # the functions name their inputs the way `terms` does: (student, teacher|weak, target, prev_probs)
        available = {"target": target, **inputs}
        positional = [student] + [available[p] for p in _positional_parameters(self.fn)[1:]]
        if "votes" in self.needs:
            kwargs["votes"] = votes
        scale = loss_w * self.warmup_factor(args, epoch=epoch)
        if self.terms_fn is not None:
            method_terms = self.terms_fn(*positional, **kwargs)
        else:
            method_terms = {self.name.replace("-", "_"): self.fn(*positional, **kwargs)}
        out.update({k: scale * v for k, v in method_terms.items()})
        return out


def _spec(name, fn, terms_fn, needs, replaces_ce, ce_weight, loss_weight, defaults, reference, optional=()):
    return LossSpec(
        name, fn, terms_fn, frozenset(needs), replaces_ce, ce_weight, loss_weight,
        MappingProxyType(dict(defaults)), reference, frozenset(optional),
    )


LOSSES: Mapping[str, LossSpec] = MappingProxyType({
    s.name: s
    for s in [
        _spec("ce", None, None, (), False, 1.0, 0.0, {}, "cross-entropy"),
        _spec(
            "ls", label_smoothing, None, (), True, 0.0, 1.0, {"epsilon": 0.1},
            "Szegedy et al., CVPR 2016, Rethinking the Inception Architecture, §7 (torch convention (1−ε)y+ε/C)",
        ),
        _spec(
            "kd", kd, None, ("teacher",), False, 0.5, 0.5, {"temperature": 1.0},
            "Hinton et al., 2015, Distilling the Knowledge in a Neural Network; KL form of NKD paper Eq. 2–3 "
            "(mdistiller kd_loss)",
        ),
        _spec(
            "dkd", dkd, dkd_terms, ("teacher",), False, 1.0, 1.0,
            {"alpha": 1.0, "beta": 0.5, "temperature": 1.0, "warmup": 1},
            "Zhao et al., CVPR 2022, Decoupled Knowledge Distillation, Eq. 7 (mdistiller dkd_loss)",
        ),
        _spec(
            "nkd", nkd, nkd_terms, ("teacher",), False, 1.0, 1.0, {"gamma": 1.5, "temperature": 1.0},
            "Yang et al., ICCV 2023, From KD to Self-KD (NKD/USKD), Eq. 4 (cls_KD NKDLoss)",
        ),
        _spec(
            "tf-kd", tf_kd, None, (), False, 0.9, 0.1,
            {"temperature": 20.0, "correct_prob": 0.99, "multiplier": 100.0},
            "Yuan et al., CVPR 2020, Revisiting KD via Label Smoothing Regularization, Tf-KD_reg Eq. 9–10 "
            "(released loss_kd_regularization)",
        ),
        _spec(
            "zipf-ls", zipf_ls, None, ("votes",), False, 1.0, 0.1, {},
            "Liang et al., ECCV 2022, Efficient One Pass Self-distillation with Zipf's Label Smoothing "
            "(released zipf_loss, KL term)",
            optional=("votes",),
        ),
        _spec(
            "tf-nkd", tf_nkd, tf_nkd_terms, (), False, 1.0, 1.0, {},
            "Yang et al., Rethinking Knowledge Distillation via Cross-Entropy (arXiv 2208.10139), Eq. 8",
        ),
        _spec(
            "pskd", pskd, None, ("prev_probs",), True, 0.0, 1.0, {"alpha_T": 0.3},
            "Kim et al., ICCV 2021, Self-Knowledge Distillation with Progressive Refinement of Targets, Eq. 4–5",
        ),
        _spec(
            "uskd", uskd, uskd_terms, ("weak",), False, 1.0, 1.0,
            {"alpha": 1.0, "beta": 0.1, "mu": 0.005, "rank": "paper"},
            "Yang et al., ICCV 2023, From KD to Self-KD (NKD/USKD), Eq. 6–13 (cls_KD USKDLoss)",
        ),
    ]
})


def get_loss(name: str) -> LossSpec:
    """The table row for a CLI name (hyphens) or Python name (underscores)."""
    key = name.replace("_", "-")
    if key == "label-smoothing":
        key = "ls"
    if key not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
    return LOSSES[key]


def _parse_value(loss: str, key: str, raw: str, default: Any) -> Any:
    if isinstance(default, str):
        return raw
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"--loss-arg {key}={raw!r} for loss {loss!r}: expected a number") from None
    if not math.isfinite(value):
        raise ValueError(f"--loss-arg {key}={raw!r} for loss {loss!r}: expected a finite number")
    if isinstance(default, int) and not isinstance(default, bool):
        if not value.is_integer():
            raise ValueError(f"--loss-arg {key}={raw!r} for loss {loss!r}: expected an integer")
        return int(value)
    return value


def parse_loss_args(name: str, pairs: Iterable[str] | Mapping[str, Any] = ()) -> dict[str, Any]:
    """Validate ``--loss-arg KEY=VALUE`` pairs (or a mapping) for loss ``name`` and merge them over its defaults.

    Numbers are parsed (integers where the default is one); an unknown key raises ValueError naming the loss
    and the keys it accepts. String choices (uskd ``rank``) are checked by calling the loss's own validation.
    """
    spec = get_loss(name)
    items = pairs.items() if isinstance(pairs, Mapping) else [_split_pair(spec.name, p) for p in pairs]
    args = dict(spec.defaults)
    allowed_keys = spec.allowed_args()
    for key, raw in items:
        if key not in allowed_keys:
            allowed = ", ".join(sorted(allowed_keys)) or "none"
            raise ValueError(f"loss {spec.name!r} has no argument {key!r}; allowed: {allowed}")
        default = spec.defaults[key]
        args[key] = _parse_value(spec.name, key, raw, default) if isinstance(raw, str) else raw
    if spec.name == "uskd" and args["rank"] not in ("paper", "official"):
        raise ValueError(f"loss 'uskd' argument rank must be 'paper' or 'official', got {args['rank']!r}")
    return args


def _split_pair(loss: str, pair: str) -> tuple[str, str]:
    key, sep, value = pair.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--loss-arg for loss {loss!r} must look like KEY=VALUE, got {pair!r}")
    return key.strip(), value.strip()


def _positional_parameters(fn: Callable) -> tuple[str, ...]:
    return tuple(p.name for p in inspect.signature(fn).parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD)


def keyword_parameters(fn: Callable) -> tuple[str, ...]:
    """Names of a function's keyword-only parameters (what ``--loss-arg`` may set, plus loop-supplied ones)."""
    return tuple(p.name for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY)


__all__ = [
    "INPUTS", "LOSSES", "LossSpec", "cross_entropy", "dkd", "dkd_terms", "get_loss", "kd", "keyword_parameters",
    "label_smoothing", "nkd", "nkd_terms", "parse_loss_args", "pskd", "pskd_alpha", "tf_kd", "tf_nkd",
    "tf_nkd_terms", "uskd", "uskd_terms", "zipf_ls",
]
