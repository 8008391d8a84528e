"""Format 2.0's soft-label codec: one unsigned-integer matrix per unit, all fields of a view in one column.

A unit's rows are encoded into a ``(F, n)`` matrix (one row per *field*, one column per view) of uint16 (uint32
when C > 65536 or the value step is finer than 2^-10), which the cache stores as ONE chunk per unit. The chunk's
*compressor* (FORMAT.md "The rows array") is, since this codec's ``compressor`` setting exists, ``lzma``: a byte
shuffle over the whole field-major matrix (the low bytes of every field, field after field, then the high bytes)
and raw LZMA2 with no literal context (lc = lp = pb = 0). LZMA2's coder is an *adaptive* binary arithmetic
coder: walking the field-major bytes it learns each field's statistics as it goes, where zstd's Huffman literals
share one table for every field of the chunk. Measured at k = 10 of 1000 classes (`pipelines/bench_storage.py`):
21.96 B/view against 23.08 for ``blosc`` (zstd level 9 with bit shuffle, the compressor of caches written before
it, which stay readable and which ``-blosc`` in a codec name still writes); it decodes a 1000-view unit in ~1 ms.

Fields, in order (k = top-k, R = temperatures, P = view params, m = sampled tail classes):

    [0]              c_1                           the top-1 class
    [1, k)           (c_j - c_1) mod C             the other top-k classes, largest first (confusable classes
                                                   tend to sit close together: fewer distinct byte values)
    [k]              q_1 = round(-log p_1 / step)  top-1 log-probability at T = 1, quantised
    (k, 2k)          q_j - q_{j-1} >= 0            the others as gaps of monotone cumulative codes
                                                   q_j = round(f(v_j) / step), v_j = log p̂_1 - log p_j >= 0
                                                   (distance below the decoded top-1), f(v) = v up to `knee`
                                                   nats, knee + (v - knee) / 2 beyond: half the precision for
                                                   classes e^knee times less likely than the top-1. The default
                                                   knee 0 keeps the top-1 at step and the others at 2 x step:
                                                   the top-1's precision is what the NKD/DKD gradients feel.
    [2k]             the target's position j (0 = top-1) when it is one of the top-k, else k + zigzag(Q_t - Q_k),
                     Q_t coded like the others from its log-probability
    [2k+1, 2k+1+R)   0 when no mass is left outside the known classes, else 1 + zigzag(round((ℓ_T - log p̂_k) / rstep))
                     (coded from the decoded k-th log-prob, which it follows) with
                     ℓ_T = log(rest_T / (1 - rest_T)), rest_T = the teacher mass at temperature T outside
                     top-k ∪ {target} (log-odds: relative precision on the rest AND on the known mass);
                     rstep = 2^-rest_bits (default: step)
    next P           the view params (int16, two's complement)
    next m           sampled tail classes (c - c_1) mod C       (tail "sampled" only)
    next m           their log p at T = 1 as gaps from q_k      (tail "sampled" only; sorted largest first)

Storing ``rest`` explicitly (instead of deriving it as 1 - Σ known) is what keeps the tail faithful: derived by
subtraction, the rounding of a large top-1 probability lands in the (small) tail mass and, through the
renormalisation of the non-target classes in NKD/DKD, in every tail class (measured: NKD gradient error 14.8 %
with an 8-bit log step and no explicit rest vs 7.3 % with it; README design notes).

zigzag(x) = 2x for x >= 0, -2x - 1 for x < 0.

Error bound: the top-1 log-probability is within step / 2 of the teacher's float32 value (step = 2^-step_bits),
the rest's log-odds within rstep / 2; every other stored log-probability (top-k, target, sampled classes)
within step / 2 when it is within ``knee`` nats of the top-1, within step beyond. Codes are clipped to the
dtype's range (at the defaults a log-probability below -2047, p < e^-2047, is stored as that bound).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

#: the default value step is 2^-DEFAULT_STEP_BITS nats (the top-1: relative probability error <= 0.8 %). 6, not
#: 5, since the lzma compressor: its 1.1 B/view paid for the finer step (NKD gradient error 7.23 % vs 7.32 % at
#: k = 10, within 24 B/view everything included; README "Storage frontier")
DEFAULT_STEP_BITS = 6
#: distances below the top-1 beyond DEFAULT_KNEE nats are kept at half the precision (0: all of them)
DEFAULT_KNEE = 0.0
MAX_STEP_BITS = 20
#: the codec a format-2 dump writes unless told otherwise (`dump --codec`)
DEFAULT_CODEC = "packed-q6"
#: how a unit's matrix is compressed (module docstring): ``lzma`` for new caches; ``blosc`` is what caches written
#: before the setting existed use (their codec JSON has no "compressor")
COMPRESSORS = ("lzma", "blosc")
DEFAULT_COMPRESSOR = "lzma"
LEGACY_COMPRESSOR = "blosc"
_NAME = re.compile(r"packed-q(\d{1,2})(?:-knee(\d+(?:\.\d+)?))?(?:-r(\d{1,2}))?(?:-(blosc))?")


def codec_name(step_bits: int = DEFAULT_STEP_BITS, knee: float = DEFAULT_KNEE, rest_bits: int | None = None,
               compressor: str = DEFAULT_COMPRESSOR) -> str:
    """The name of a packed codec's value coding, as `info` prints it and `dump --codec` takes it:
    ``packed-q<step_bits>[-knee<knee>][-r<rest_bits>][-blosc]``."""
    return (f"packed-q{step_bits}" + (f"-knee{knee:g}" if knee else "")
            + (f"-r{rest_bits}" if rest_bits is not None else "")
            + ("" if compressor == DEFAULT_COMPRESSOR else f"-{compressor}"))


def codec_settings(name: str) -> dict:
    """``{"step_bits", "knee", "rest_bits", "compressor"}`` of a `codec_name`; ValueError saying the grammar and
    the limits."""
    m = _NAME.fullmatch(name.strip())
    if m is None:
        raise ValueError(f"codec {name!r}: expected packed-q<B>[-knee<N>][-r<R>][-blosc], e.g. {DEFAULT_CODEC} or "
                         f"packed-q4-knee4 (values at 2^-B nats; beyond N nats below the top-1 at half that "
                         f"precision; the rest field at 2^-R nats; -blosc: the chunks compressed as caches made "
                         f"before the lzma compressor were)")
    step_bits, knee, rest = int(m.group(1)), float(m.group(2) or DEFAULT_KNEE), m.group(3)
    settings = {"step_bits": step_bits, "knee": knee, "rest_bits": None if rest is None else int(rest),
                "compressor": m.group(4) or DEFAULT_COMPRESSOR}
    if not 0 <= step_bits <= MAX_STEP_BITS:
        raise ValueError(f"codec {name!r}: the value step's bits must be in [0, {MAX_STEP_BITS}]")
    if settings["rest_bits"] is not None and not settings["rest_bits"] <= step_bits:
        raise ValueError(f"codec {name!r}: the rest field's bits (-r) must be <= the value step's ({step_bits})")
    return settings


@dataclass(frozen=True)
class PackedCodec:
    """Layout of the per-unit matrix for one group's settings."""

    k: int
    num_classes: int
    n_temperatures: int
    n_params: int
    step_bits: int = DEFAULT_STEP_BITS
    tail_samples: int = 0  # m, for the sampled tail
    knee: float = DEFAULT_KNEE
    #: the rest field's step is 2^-rest_bits nats (None: the value step, 2^-step_bits)
    rest_bits: int | None = None
    #: how the cache compresses the unit's matrix (`COMPRESSORS`; the module docstring)
    compressor: str = DEFAULT_COMPRESSOR

    def __post_init__(self):
        if not 1 <= self.k <= self.num_classes:
            raise ValueError(f"k={self.k} must be in [1, {self.num_classes}]")
        if not 0 <= self.step_bits <= MAX_STEP_BITS:
            raise ValueError(f"step_bits must be in [0, {MAX_STEP_BITS}], got {self.step_bits}")
        if self.tail_samples < 0:
            raise ValueError("tail_samples must be >= 0")
        if not (self.knee >= 0 and np.isfinite(self.knee)):
            raise ValueError(f"knee must be >= 0 nats, got {self.knee}")
        if self.rest_bits is not None and not 0 <= self.rest_bits <= self.step_bits:
            raise ValueError(f"rest_bits must be in [0, step_bits={self.step_bits}], got {self.rest_bits}")
        if self.compressor not in COMPRESSORS:
            raise ValueError(f"compressor must be one of {COMPRESSORS}, got {self.compressor!r}")

    @property
    def name(self) -> str:
        return codec_name(self.step_bits, self.knee, self.rest_bits, self.compressor)

    def to_json(self) -> dict:
        return {"name": "packed", "step_bits": self.step_bits, "knee": self.knee, "tail_samples": self.tail_samples,
                "dtype": self.dtype, "fields": self.n_fields, "compressor": self.compressor,
                **({"rest_bits": self.rest_bits} if self.rest_bits is not None else {})}

    @property
    def step(self) -> float:
        return 2.0 ** -self.step_bits

    @property
    def rest_step(self) -> float:
        """The rest field's step (nats of log-odds)."""
        return self.step if self.rest_bits is None else 2.0 ** -self.rest_bits

    @property
    def logprob_bound(self) -> float:
        """How far a reconstructed known log-probability may be from the teacher's, at any recorded temperature
        (FORMAT.md's error bound): its own code (<= step), plus the normalisation c_T: <= step from the known
        values and <= rest_step / 2 from the rest's log-odds (2.5 steps when the rest has the value step)."""
        return 2 * self.step + self.rest_step / 2

    @property
    def dtype(self) -> str:
        return "uint16" if self.num_classes <= 65536 and self.step_bits <= 10 else "uint32"

    @property
    def max_code(self) -> int:
        return int(np.iinfo(self.dtype).max)

    # field offsets
    @property
    def n_fields(self) -> int:
        return 2 * self.k + 1 + self.n_temperatures + self.n_params + 2 * self.tail_samples

    def _slices(self):
        k, r, p, m = self.k, self.n_temperatures, self.n_params, self.tail_samples
        o = 0
        out = {}
        for name, size in (("idx", k), ("val", k), ("tgt", 1), ("rest", r), ("params", p), ("tidx", m),
                           ("tval", m)):
            out[name] = slice(o, o + size)
            o += size
        return out

    def _qv(self, v) -> np.ndarray:
        """Codes of distances v >= 0 below the top-1: round(f(v) / step), f the knee compander."""
        v = np.maximum(np.asarray(v, dtype=np.float64), 0.0)
        f = np.where(v <= self.knee, v, self.knee + (v - self.knee) / 2)
        return self._q(-f)

    def _vq(self, q: np.ndarray) -> np.ndarray:
        f = np.asarray(q, dtype=np.float64) * self.step
        return np.where(f <= self.knee, f, self.knee + 2 * (f - self.knee))

    # ------------------------------------------------------------------ encode
    def _q(self, lp: np.ndarray) -> np.ndarray:
        """round(-lp / step) clipped to [0, max_code - 1] (one code is kept for the +1 offsets)."""
        with np.errstate(invalid="ignore", over="ignore"):
            q = np.round(-np.asarray(lp, dtype=np.float64) / self.step)
        return np.clip(np.nan_to_num(q, nan=self.max_code - 1, posinf=self.max_code - 1), 0,
                       self.max_code - 1).astype(np.int64)

    def encode(self, indices, logprobs, target_position, target_logprob, log_odds_rest, params,
               tail_indices=None, tail_logprobs=None) -> np.ndarray:
        """(F, n) matrix of one unit's rows.

        indices (n, k) int, largest first; logprobs (n, k) T=1 log-probabilities (sorted descending);
        target_position (n,) int: the target's column in the top-k, -1 when outside; target_logprob (n,) T=1;
        log_odds_rest (n, R) log(rest / (1 - rest)) of the mass outside the known classes per temperature
        (-inf when none); params (n, P) int16; tail_* (n, m) for the sampled tail.
        """
        n = indices.shape[0]
        C = self.num_classes
        s = self._slices()
        out = np.zeros((self.n_fields, n), dtype=np.int64)
        idx = np.asarray(indices, dtype=np.int64)
        if n and (idx.min() < 0 or idx.max() >= C):
            raise ValueError(f"class index outside [0, {C})")
        out[s["idx"]][0] = idx[:, 0]
        out[s["idx"]][1:] = ((idx[:, 1:] - idx[:, :1]) % C).T
        lp = np.asarray(logprobs, dtype=np.float64)
        q1 = self._q(lp[:, 0])
        top = -q1 * self.step  # the decoded top-1: the others are coded relative to it
        q = np.concatenate([q1[:, None], self._qv(top[:, None] - lp[:, 1:])], axis=1)
        q[:, 1:] = np.maximum.accumulate(q[:, 1:], axis=1)  # monotone: gaps >= 0 (ties/rounding)
        out[s["val"]] = np.diff(q, axis=1, prepend=0).T
        if self.k > 1:
            out[s["val"]][1] = q[:, 1]  # the first gap is from 0, not from q_1 (another scale)
        pos = np.asarray(target_position, dtype=np.int64)
        qk = q[:, -1] if self.k > 1 else np.zeros(n, dtype=np.int64)
        out[s["tgt"]][0] = np.where(pos >= 0, pos, self.k + zigzag(self._qv(top - np.asarray(target_logprob)) - qk))
        lo = np.asarray(log_odds_rest, dtype=np.float64).reshape(n, self.n_temperatures)
        none = np.isneginf(lo)
        anchor = (top - self._vq(qk))[:, None]  # the decoded k-th log-probability: the rest is coded from it
        with np.errstate(invalid="ignore"):
            r = np.clip(np.round((np.where(none, 0.0, lo) - anchor) / self.rest_step), -(self.max_code // 2 - 1),
                        self.max_code // 2 - 1)
        out[s["rest"]] = np.where(none, 0, 1 + zigzag(r.astype(np.int64))).T
        out[s["params"]] = np.asarray(params, dtype=np.int16).astype(np.int64).T & 0xFFFF
        if self.tail_samples:
            ti = np.asarray(tail_indices, dtype=np.int64)
            tq = self._qv(top[:, None] - np.asarray(tail_logprobs, dtype=np.float64))
            order = np.argsort(tq, axis=1, kind="stable")  # largest probability first
            ti, tq = np.take_along_axis(ti, order, 1), np.take_along_axis(tq, order, 1)
            tq = np.maximum(tq, qk[:, None])
            out[s["tidx"]] = ((ti - idx[:, :1]) % C).T
            out[s["tval"]] = np.diff(tq, axis=1, prepend=qk[:, None]).T
        if out.max(initial=0) > self.max_code:
            raise ValueError(f"a code exceeds {self.dtype}: cannot encode")
        return out.astype(self.dtype)

    # ------------------------------------------------------------------ decode
    def decode(self, mat: np.ndarray) -> dict[str, np.ndarray]:
        """Inverse of `encode` (values to their quantised log-probabilities). Keys: indices (n,k) int64,
        logprobs (n,k) float32, target_logprob (n,) float32,
        log_odds_rest (n,R) float64 (-inf: no rest), params (n,P) int16, tail_indices/tail_logprobs (n,m)."""
        mat = np.asarray(mat)
        if mat.ndim != 2 or mat.shape[0] != self.n_fields:
            raise ValueError(f"packed unit has shape {mat.shape}, expected ({self.n_fields}, n)")
        C, s, step = self.num_classes, self._slices(), self.step
        m = mat.astype(np.int64)
        idx = m[s["idx"]].T.copy()
        idx[:, 1:] = (idx[:, 1:] + idx[:, :1]) % C
        codes = m[s["val"]].T
        top = -codes[:, 0] * step
        q = np.cumsum(codes[:, 1:], axis=1)  # (n, k-1) codes of the distances below the top-1
        qk = q[:, -1] if self.k > 1 else np.zeros(len(top), dtype=np.int64)
        lp = np.concatenate([top[:, None], top[:, None] - self._vq(q)], axis=1)
        tcode = m[s["tgt"]][0]
        rcode = m[s["rest"]].T
        inside = tcode < self.k
        tlp = np.where(inside, np.take_along_axis(lp, np.minimum(tcode, self.k - 1)[:, None], 1)[:, 0],
                       top - self._vq(qk + unzigzag(np.maximum(tcode - self.k, 0))))
        out = {
            "indices": idx,
            "logprobs": lp.astype(np.float32),
            "target_logprob": tlp.astype(np.float32),
            "log_odds_rest": np.where(rcode == 0, -np.inf,
                                      lp[:, -1:] + unzigzag(np.maximum(rcode - 1, 0)) * self.rest_step),
            "params": (m[s["params"]].T.astype(np.uint16)).view(np.int16),
        }
        if self.tail_samples:
            ti = (m[s["tidx"]].T + idx[:, :1]) % C
            tq = qk[:, None] + np.cumsum(m[s["tval"]].T, axis=1)
            out["tail_indices"] = ti
            out["tail_logprobs"] = (top[:, None] - self._vq(tq)).astype(np.float32)
        return out


def zigzag(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.int64)
    return np.where(x >= 0, 2 * x, -2 * x - 1)


def unzigzag(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.int64)
    return np.where(z % 2 == 0, z // 2, -(z + 1) // 2)


# ------------------------------------------------------------------ TopKLogits <-> unit matrix
def encode_topk(codec: PackedCodec, tk, params) -> np.ndarray:
    """The (F, n) matrix of a `TopKLogits` made with ``keep_rest=True`` (and the tail's per-row data)."""
    if tk.log_rest is None:
        raise ValueError("format 2 needs the rest mass: TopKLogits.from_logits(..., keep_rest=True)")
    if tuple(tk.log_rest.shape[1:]) != (codec.n_temperatures,) or tk.k != codec.k:
        raise ValueError("rows do not match the codec (k or temperatures)")
    hit = tk.indices == tk.target[:, None]
    in_top = hit.any(1)
    position = torch.where(in_top, hit.float().argmax(1), -1)
    log_odds = []
    for t in tk.temperatures:
        known = tk.topk_log_probs(t).double()
        tl = tk.target_log_probs(t).double()
        known = torch.cat([known, torch.where(in_top, -torch.inf, tl)[:, None]], 1)
        log_known = torch.logsumexp(known, 1)
        lr = tk.log_rest[:, tk._temperature_column(t)].double()
        log_odds.append(torch.where(torch.isneginf(lr), -torch.inf, lr - log_known))
    lp1 = tk.topk_log_probs(1.0).numpy()
    return codec.encode(
        tk.indices.numpy(), lp1, position.numpy(), tk.target_log_probs(1.0).numpy(),
        torch.stack(log_odds, 1).numpy(), params,
        None if tk.tail_indices is None else tk.tail_indices.numpy(),
        None if tk.tail_logprobs is None else tk.tail_logprobs.numpy(),
    )


def decode_unit(codec: PackedCodec, mat: np.ndarray, temperatures: tuple[float, ...]) -> dict[str, np.ndarray]:
    """Arrays for `TopKLogits` rows of a unit (all but ``target``, which comes from the data): indices, logits,
    target_logprob, lse, log_rest, tail_indices/tail_logprobs, params.

    Convention (so `TopKLogits` needs no special case): ``logits`` are the stored T = 1 log-probabilities and
    ``lse[:, T]`` = -c_T where c_T normalises the known classes at T so that they hold 1 - rest_T.
    """
    d = codec.decode(mat)
    lp = d["logprobs"].astype(np.float64)
    tl = d["target_logprob"].astype(np.float64)
    lo = d["log_odds_rest"]
    outside = mat[codec._slices()["tgt"]][0].astype(np.int64) >= codec.k
    cols_lse, cols_rest = [], []
    for j, t in enumerate(temperatures):
        known = np.concatenate([lp / t, np.where(outside, tl / t, -np.inf)[:, None]], 1)
        log_known_raw = _logsumexp(known)
        none = np.isneginf(lo[:, j])
        lo_j = np.where(none, 0.0, lo[:, j])
        # known mass 1 - rest = sigmoid(-lo); rest = sigmoid(lo)
        log_known = np.where(none, 0.0, -np.logaddexp(0.0, lo_j))
        log_rest = np.where(none, -np.inf, -np.logaddexp(0.0, -lo_j))
        c_t = log_known - log_known_raw
        cols_lse.append(-c_t)
        cols_rest.append(log_rest)
    lse = np.stack(cols_lse, 1)
    j1 = temperatures.index(1.0)
    out = {
        "indices": d["indices"],
        "logits": d["logprobs"],
        # T = 1 log-prob of the target normalised like the others: stored value + c_1
        "target_logprob": (tl - lse[:, j1]).astype(np.float32),
        "lse": lse.astype(np.float32),
        "log_rest": np.stack(cols_rest, 1).astype(np.float32),
        "params": d["params"],
    }
    if codec.tail_samples:
        out["tail_indices"] = d["tail_indices"]
        out["tail_logprobs"] = (d["tail_logprobs"] - lse[:, j1, None]).astype(np.float32)
    return out


def _logsumexp(a: np.ndarray) -> np.ndarray:
    m = np.max(a, axis=1)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return m + np.log(np.exp(a - m[:, None]).sum(1))
