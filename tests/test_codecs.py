"""Format 2's soft-label codec and tail rules (logitcache.labels): round trips, error bounds, unbiasedness."""

import json
import math
import pathlib
import shutil
import warnings

import numpy as np
import pytest
import torch

from logitcache.labels.codecs import PackedCodec, decode_unit, encode_topk
from logitcache.labels.tails import (
    TAIL_FLOOR,
    UNIFORM,
    PriorAccumulator,
    PriorTail,
    SampledTail,
    parse_tail,
    tail_from_settings,
    tail_settings,
)
from logitcache.labels.topk import TopKLogits, teacher_log_probs
from logitcache.losses import dkd, kd, nkd


def _teacher(n=48, c=40, seed=0, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, c, generator=g) * scale
    y = torch.randint(0, c, (n,), generator=g)
    return z, y


def _params(n, p=5, seed=0):
    return np.random.default_rng(seed).integers(-300, 3000, (n, p)).astype(np.int16)


def decoded_rows(codec, tk, params, target, temperatures, tail=UNIFORM) -> tuple[TopKLogits, np.ndarray]:
    """What the cache reader does with a unit's matrix (the target comes from the data)."""
    d = decode_unit(codec, encode_topk(codec, tk, params), temperatures)
    idx, logits = torch.from_numpy(d["indices"]), torch.from_numpy(d["logits"])
    lse, tl = torch.from_numpy(d["lse"]), torch.from_numpy(d["target_logprob"])
    extra = {}
    if "tail_indices" in d:
        extra = {"tail_indices": torch.from_numpy(d["tail_indices"]),
                 "tail_logprobs": torch.from_numpy(d["tail_logprobs"])}
    rows = TopKLogits(idx, logits, target, tl, lse, temperatures, tk.num_classes,
                      torch.from_numpy(d["log_rest"]), tail, **extra)
    return rows, d["params"]


@pytest.mark.parametrize("k", [1, 5, 10, 40])
@pytest.mark.parametrize("tail", ["uniform", "sampled:4"])
def test_round_trip_within_the_stated_bound(k, tail):
    z, y = _teacher()
    temps = (1.0, 4.0)
    name, m = parse_tail(tail)
    rule = SampledTail(m) if name == "sampled" else UNIFORM
    tk = TopKLogits.from_logits(z, y, k, temps, keep_rest=True, tail=rule, generator=torch.Generator().manual_seed(1))
    codec = PackedCodec(k, 40, len(temps), 5, step_bits=5, tail_samples=m)
    params = _params(len(y))
    rows, p = decoded_rows(codec, tk, params, y, temps, rule)
    assert (rows.indices == tk.indices).all()
    assert (p == params).all()
    # knee 0: the top-1 within step/2, the others within step (2 x step / 2), at T = 1 and after normalising
    step = codec.step
    err = (rows.topk_log_probs(1.0) - tk.topk_log_probs(1.0)).abs()
    assert err[:, 0].max() <= step + 1e-5  # step/2 for the value + step/2 for the normalisation
    assert err.max() <= 1.5 * step + 1e-5
    terr = (rows.target_log_probs(1.0) - tk.target_log_probs(1.0)).abs()
    assert terr.max() <= 1.5 * step + 1e-5
    # every row is a distribution at every recorded temperature
    for t in temps if not m else ():  # (a sampled tail sums to 1 only in expectation)
        assert rows.probs(t).sum(1).sub(1).abs().max() < 1e-4
    if k < 40:
        rest = rows.log_rest.exp() - tk.log_rest.exp()
        assert rest.abs().max() <= 0.05 * tk.log_rest.exp().max()
    if m:
        assert (rows.tail_indices.sort(1).values == tk.tail_indices.sort(1).values).all()


def test_k_equals_c_is_exact_to_float16_rounding():
    z, y = _teacher(n=16, c=30, seed=3)
    temps = (1.0, 4.0)
    tk = TopKLogits.from_logits(z, y, 30, temps, keep_rest=True)
    assert torch.isneginf(tk.log_rest).all()  # nothing outside the known classes
    codec = PackedCodec(30, 30, 2, 5, step_bits=14)
    rows, _ = decoded_rows(codec, tk, _params(16), y, temps)
    for t in temps:
        torch.testing.assert_close(rows.log_probs(t), torch.log_softmax(z / t, 1), atol=2e-4, rtol=0)
    student = torch.randn(16, 30, generator=torch.Generator().manual_seed(9))
    for fn in (lambda tch: kd(student, tch, temperature=4.0), lambda tch: nkd(student, tch, y),
               lambda tch: dkd(student, tch, y, alpha=1.0, beta=8.0, temperature=4.0)):
        assert float(fn(rows)) == pytest.approx(float(fn(z)), rel=1e-5, abs=1e-5)


def test_codec_refuses_what_it_cannot_hold():
    with pytest.raises(ValueError, match="k=0"):
        PackedCodec(0, 10, 1, 5)
    codec = PackedCodec(2, 10, 1, 1)
    with pytest.raises(ValueError, match="shape"):
        codec.decode(np.zeros((3, 4), dtype=np.uint16))
    with pytest.raises(ValueError, match="rest"):
        z, y = _teacher(n=4, c=10)
        encode_topk(codec, TopKLogits.from_logits(z, y, 2), _params(4, 1))


def test_explicit_rest_matters_for_a_confident_teacher():
    # the top-1 holds ~all the mass: 1 - sum(known) would turn its rounding into the tail mass
    z, y = _teacher(n=32, c=50, seed=4, scale=1.0)
    z[:, 0] += 12.0
    temps = (1.0,)
    tk = TopKLogits.from_logits(z, y, 3, temps, keep_rest=True)
    rows, _ = decoded_rows(PackedCodec(3, 50, 1, 0, step_bits=5), tk, _params(32, 0), y, temps)
    rel = (rows.log_rest.exp() / tk.log_rest.exp() - 1).abs()
    assert rel.max() < 0.05  # the rest keeps its relative precision however small it is


def test_uniform_tail_with_rest_equals_format_1_rule():
    z, y = _teacher(n=8, c=20, seed=5)
    old = TopKLogits.from_logits(z, y, 4, (1.0, 4.0))
    new = TopKLogits.from_logits(z, y, 4, (1.0, 4.0), keep_rest=True)
    for t in (1.0, 4.0):
        # the same rule (the recorded rest avoids the cancellation in 1 - sum(known))
        torch.testing.assert_close(new.log_probs(t), old.log_probs(t), atol=1e-3, rtol=0)
        known = torch.zeros(8, 20, dtype=torch.bool).scatter_(1, old.indices, True)
        known[torch.arange(8), y] = True
        exact = torch.softmax(z.double() / t, 1).masked_fill(known, 0).sum(1)
        err_new = (new.probs(t).double().masked_fill(known, 0).sum(1) - exact).abs().max()
        assert err_new < 1e-6


def test_sampled_tail_is_unbiased():
    # the mean of the reconstruction over many independent draws -> the dense distribution, and so the mean
    # of the NKD / KD gradients -> the dense gradients; a biased rule (uniform) stays away
    z, y = _teacher(n=6, c=30, seed=6, scale=2.5)
    temps = (1.0, 4.0)
    student = torch.randn(6, 30, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(8)
    draws = 3000
    tk = TopKLogits.from_logits(z.repeat(draws, 1), y.repeat(draws), 3, temps, keep_rest=True, tail=SampledTail(4),
                                generator=g)
    for t in temps:
        mean_p = tk.probs(t).double().view(draws, 6, 30).mean(0)
        dense = torch.softmax(z.double() / t, 1)
        uniform = TopKLogits.from_logits(z, y, 3, temps, keep_rest=True).probs(t).double()
        err, err_uniform = (mean_p - dense).abs().max(), (uniform - dense).abs().max()
        assert err < 0.2 * err_uniform, (t, err, err_uniform)

    def grad(fn, teacher, s):
        s = s.clone().requires_grad_(True)
        (gr,) = torch.autograd.grad(fn(teacher, s), s)
        return gr

    for fn in (lambda tch, s: nkd(s, tch, y.repeat(len(s) // 6)), lambda tch, s: kd(s, tch, temperature=4.0)):
        ref = grad(fn, z, student)
        mean_g = grad(fn, tk, student.repeat(draws, 1)).view(draws, 6, 30).mean(0) * draws
        uni = grad(fn, TopKLogits.from_logits(z, y, 3, temps, keep_rest=True), student)
        rel, rel_uniform = (mean_g - ref).norm() / ref.norm(), (uni - ref).norm() / ref.norm()
        assert rel < 0.25 * rel_uniform, (rel, rel_uniform)


def test_prior_tail_uses_the_class_conditional_mean():
    # two kinds of rows: top-1 class 0 puts its tail on class 5, top-1 class 1 on class 9
    c = 12
    z = torch.full((40, c), -6.0)
    z[:20, 0], z[:20, 5] = 6.0, 0.0
    z[20:, 1], z[20:, 9] = 6.0, 0.0
    z += 0.1 * torch.randn(40, c, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0] * 20 + [1] * 20)
    acc = PriorAccumulator(c)
    tk1 = TopKLogits.from_logits(z, y, 1)
    acc.add(z, tk1.indices, y)
    rule = PriorTail(acc.prior(), prior_views=acc.views)
    rows = TopKLogits.from_logits(z, y, 1, keep_rest=True)
    rows = TopKLogits(rows.indices, rows.logits, rows.target, rows.target_logprob, rows.lse, rows.temperatures, c,
                      rows.log_rest, rule)
    p = rows.probs(1.0)
    assert p[:20, 5].min() > 10 * p[:20, 9].max()
    assert p[20:, 9].min() > 10 * p[20:, 5].max()
    assert p.sum(1).sub(1).abs().max() < 1e-5
    dense = torch.softmax(z, 1)
    kl = lambda q: (dense * (dense.log() - q.log())).sum(1).mean()  # noqa: E731
    assert kl(p) < 0.2 * kl(TopKLogits.from_logits(z, y, 1, keep_rest=True).probs(1.0))
    assert teacher_log_probs(rows, 1.0).shape == (40, c)


def test_rows_slice_and_concatenate_with_their_tail():
    z, y = _teacher(n=6, c=20)
    tk = TopKLogits.from_logits(z, y, 3, (1.0,), keep_rest=True, tail=SampledTail(2),
                                generator=torch.Generator().manual_seed(0))
    back = TopKLogits.cat([tk[i] for i in range(6)])
    torch.testing.assert_close(back.log_probs(), tk.log_probs())
    with pytest.raises(ValueError, match="tail"):
        TopKLogits.cat([tk[0], TopKLogits.from_logits(z[:1], y[:1], 3, (1.0,), keep_rest=True)])


def test_parse_tail():
    assert parse_tail("uniform") == ("uniform", 0)
    assert parse_tail("sampled:12") == ("sampled", 12)
    assert parse_tail("sampled") == ("sampled", 8)
    for bad in ("gauss", "sampled:0", "sampled:x", "prior:3"):
        with pytest.raises(ValueError):
            parse_tail(bad)
    assert math.log(TAIL_FLOOR) < -20


def test_tail_settings_round_trip_and_digest_check():
    assert tail_from_settings(tail_settings("uniform", prior_views=5)) == UNIFORM
    assert tail_from_settings(tail_settings("sampled:3", prior_views=5)) == SampledTail(3)
    prior = torch.rand(4, 4)
    rule = tail_from_settings(tail_settings("prior", prior_views=7), prior, PriorTail(prior).digest)
    assert rule.to_json() == {"name": "prior", "prior_views": 7}
    with pytest.raises(ValueError, match="digest"):
        tail_from_settings({"name": "prior"}, prior + 1, rule.digest)
    with pytest.raises(ValueError, match="needs"):
        tail_from_settings({"name": "prior"})


def test_a_format_2_unit_is_decoded_from_the_bytes_its_checksum_checked(tmp_path, monkeypatch):
    """One fetch per unit: the reader decodes the chunk whose sha256 it compared with the marker (not a second
    read through zarr, which costs a GET per unit on object stores and could see other bytes)."""
    import zarr

    from logitcache.cache import fidelity
    from logitcache.cache.reader import CacheReader

    z, y = _teacher(n=24)
    url = str(tmp_path / "c.zarr")
    lengths = fidelity.write_cache(url, z, y, _params(24), tuple(f"p{i}" for i in range(5)), 5, (1.0,),
                                   fidelity.FORMAT_2, None, 12)
    expected, _ = fidelity.read_back(url, y, lengths)

    def no_zarr_reads(self, *a, **kw):
        raise AssertionError("unit read through zarr")

    monkeypatch.setattr(zarr.Array, "__getitem__", no_zarr_reads)
    r = CacheReader(url)
    rows = TopKLogits.cat([r.topk_rows(r.read_unit(0, s), np.arange(n), y[12 * s:12 * s + n])
                           for s, n in enumerate(lengths)])
    assert torch.equal(rows.log_probs(1.0), expected.log_probs(1.0))
    assert torch.equal(rows.indices, z.topk(5, 1).indices)  # it is the teacher's top-5


def test_a_coarser_rest_step_keeps_its_bound_and_is_recorded(tmp_path):
    """``rest_bits``: the rest's log-odds within 2^-rest_bits / 2, everything else as before; the group records
    it (codec name, metadata) and a reader decodes with it."""
    from logitcache.cache import fidelity

    z, y = _teacher(n=48, scale=2.0)
    temps = (1.0, 4.0)
    tk = TopKLogits.from_logits(z, y, 5, temps, keep_rest=True)
    fine, coarse = (PackedCodec(5, 40, 2, 5, step_bits=4, rest_bits=r) for r in (None, 2))
    with pytest.raises(ValueError, match="rest_bits"):
        PackedCodec(5, 40, 2, 5, step_bits=4, rest_bits=5)
    assert coarse.name.endswith("-r2") and coarse.to_json()["rest_bits"] == 2 and "rest_bits" not in fine.to_json()
    assert coarse.logprob_bound == 2 * coarse.step + 0.125 and fine.logprob_bound == 2.5 * fine.step
    params = _params(48)
    odds = {}
    for name, codec in (("fine", fine), ("coarse", coarse)):
        m = encode_topk(codec, tk, params)
        odds[name] = codec.decode(m)["log_odds_rest"]
        rows, p = decoded_rows(codec, tk, params, y, temps)
        assert (p == params).all() and torch.equal(rows.indices, tk.indices)
    true = torch.stack([tk.log_rest[:, j].double() - torch.logsumexp(torch.cat(
        [tk.topk_log_probs(t).double(), torch.where((tk.indices == y[:, None]).any(1), -torch.inf,
                                                    tk.target_log_probs(t).double())[:, None]], 1), 1)
        for j, t in enumerate(temps)], 1).numpy()
    err = {n: np.abs(o - true).max() for n, o in odds.items()}
    assert err["fine"] <= fine.rest_step / 2 + 1e-6 < err["coarse"] <= coarse.rest_step / 2 + 1e-6
    url = str(tmp_path / "c.zarr")  # through the real writer/reader, with its metadata
    setting = fidelity.Setting("t", 2, codec={"step_bits": 4, "rest_bits": 2})
    lengths = fidelity.write_cache(url, z, y, params, tuple(f"p{i}" for i in range(5)), 5, temps, setting, None, 24)
    back, reader = fidelity.read_back(url, y, lengths)
    assert reader.codec_name == "packed-q4-r2" and reader.meta.packed_codec() == coarse
    assert torch.allclose(back.log_rest, decoded_rows(coarse, tk, params, y, temps)[0].log_rest)



def test_expected_gradient_separates_the_sampled_tails_noise_from_a_bias(tmp_path):
    """`fidelity.expected_gradient` (bench_storage's expected-gradient columns): over many draws through the codec
    the sampled tail's mean gradient approaches the dense one (error -> its Monte-Carlo floor ~ one draw /
    sqrt(R)); the uniform tail's does not move (no noise, all bias: its one-draw error)."""
    from logitcache.cache import fidelity

    z, y = _teacher(n=16, c=30, seed=11, scale=2.5)
    student = torch.randn(16, 30, generator=torch.Generator().manual_seed(12))
    params, fields = _params(16), tuple(f"p{i}" for i in range(5))
    small, big = (fidelity.measure(fidelity.sampled(4), 3, z, y, student, params, fields, (1.0,), shard_size=16,
                                   draws=r, draw_views=16) for r in (16, 1024))
    for name in ("nkd_T1", "dkd_T1"):
        one = big[f"draw_relerr_{name}"]
        assert one > 0.05  # a draw is noisy ...
        assert big[f"mc_floor_{name}"] == pytest.approx(one / 1024**0.5, rel=0.5)
        assert small[f"mc_floor_{name}"] > 4 * big[f"mc_floor_{name}"]
        # ... its mean is not: the error of the mean falls with R, down to the codec's rounding (a small bias)
        assert big[f"expected_relerr_{name}"] < 0.15 * one < small[f"expected_relerr_{name}"]
        assert big[f"bias_relerr_{name}"] < 0.1 * one
    uni = fidelity.measure(fidelity.FORMAT_2, 3, z, y, student, params, fields, (1.0,), shard_size=16, draws=64)
    assert "expected_relerr_nkd_T1" not in uni  # a deterministic tail: expected error = one-draw error
    url = str(tmp_path / "c.zarr")
    lengths = fidelity.write_cache(url, z, y, params, fields, 3, (1.0,), fidelity.FORMAT_2, None, 16)
    _, reader = fidelity.read_back(url, y, lengths)
    exp = fidelity.expected_gradient(reader.meta, reader.tail, z, y, student, params, 8)
    for name in ("nkd_T1", "dkd_T1"):  # the same codec path as the cache: the same error, no spread
        assert exp[f"expected_relerr_{name}"] == pytest.approx(uni[f"grad_relerr_{name}"], rel=1e-6)
        assert exp[f"draw_relerr_{name}"] == pytest.approx(uni[f"grad_relerr_{name}"], rel=1e-6)
        assert exp[f"mc_floor_{name}"] < 1e-6 * exp[f"expected_relerr_{name}"]


def test_codec_names_round_trip_and_bad_names_are_refused():
    from logitcache.labels.codecs import DEFAULT_CODEC, codec_name, codec_settings

    for name in (DEFAULT_CODEC, "packed-q4-knee4", "packed-q4-knee4-r2", "packed-q14", "packed-q6-knee2.5",
                 "packed-q3-r0", "packed-q5-blosc", "packed-q4-knee4-r2-blosc"):
        settings = codec_settings(name)
        assert codec_name(**settings) == name
        assert PackedCodec(10, 1000, 1, 5, **settings).name == name  # what `info` prints is what --codec takes
    assert codec_settings(DEFAULT_CODEC) == {"step_bits": 6, "knee": 0.0, "rest_bits": None, "compressor": "lzma"}
    assert codec_settings("packed-q5-blosc")["compressor"] == "blosc"
    for bad in ("packed", "packed-q", "packed-q21", "packed-q4-r5", "q5", "packed-q5-knee", "packed-q5;rm",
                "packed-q5-lzma", "packed-q5-blosc-r2", "packed-q5-zstd"):
        with pytest.raises(ValueError, match="codec"):
            codec_settings(bad)


FORMAT2_BLOSC = pathlib.Path(__file__).parent / "data" / "format2_blosc"


def test_a_format_2_cache_from_before_the_lzma_compressor_still_reads_and_verifies(tmp_path):
    """tests/data/format2_blosc was written by the code of commit c17b4d0 (its make_format2_blosc.py): blosc
    chunks and a codec JSON without "compressor". It reads back to the very log-probabilities that code read,
    names its codec packed-q5-blosc, and verifies."""
    from logitcache.cache import fidelity
    from logitcache.cache.verify import verify_cache

    url = tmp_path / "cache.zarr"
    shutil.copytree(FORMAT2_BLOSC / "cache.zarr", url)
    expected = json.loads((FORMAT2_BLOSC / "expected.json").read_text())
    group_codec = json.loads((url / "synthetic" / "zarr.json").read_text())["attributes"]["logitcache"]["codec"]
    assert "compressor" not in group_codec and expected["codec"] == "packed-q5"  # what that code called it
    target = torch.tensor(expected["target"])
    rows, reader = fidelity.read_back(str(url), target, tuple(expected["lengths"]))
    assert reader.codec_name == "packed-q5-blosc" and reader.meta.packed_codec().compressor == "blosc"
    assert torch.equal(rows.log_probs(1.0), torch.tensor(expected["log_probs_T1"]))
    assert torch.equal(rows.log_probs(4.0), torch.tensor(expected["log_probs_T4"]))
    assert [reader.read_unit(0, s).view_params.tolist() for s in range(2)] == expected["params"]
    report = verify_cache(str(url))
    assert report.units_checked == 2 and report.problems == []


def test_lzma_and_blosc_chunks_hold_the_same_codes(tmp_path):
    """The compressor is lossless and recorded: the same rows written with packed-q5 (lzma) and packed-q5-blosc
    read back identical; each array's zarr.json names its own codecs; on a 1000-class teacher's rows the lzma
    chunks are the smaller (the reason it is the default)."""
    from logitcache.cache import fidelity, schema
    from logitcache.labels.codecs import codec_settings

    g = torch.Generator().manual_seed(5)
    z = torch.randn(600, 1000, generator=g) * 3
    y = torch.randint(0, 1000, (600,), generator=g)
    params, fields = _params(600), tuple(f"p{i}" for i in range(5))
    back, sizes = {}, {}
    for name in ("packed-q5", "packed-q5-blosc"):
        url = tmp_path / f"{name}.zarr"
        setting = fidelity.Setting(name, 2, codec=codec_settings(name))
        with warnings.catch_warnings():  # zarr's "numcodecs codecs are not in the spec" is the cache's business
            warnings.simplefilter("error")
            lengths = fidelity.write_cache(str(url), z, y, params, fields, 10, (1.0,), setting, None, 300)
            back[name], reader = fidelity.read_back(str(url), y, lengths)
        assert reader.codec_name == name
        codecs = json.loads((url / "synthetic" / "rows" / "zarr.json").read_text())["codecs"]
        if name.endswith("blosc"):
            assert [c["name"] for c in codecs] == ["bytes", "blosc", "crc32c"]
        else:
            assert codecs == schema.packed_codecs_json(reader.meta.packed_codec())
        sizes[name] = sum(f.stat().st_size for f in (url / "synthetic" / schema.PACKS_DIR).glob("*.bin"))
        assert sizes[name] > 0  # the unit chunks, back to back in the epoch's pack
    a, b = back.values()
    for t in ("indices", "logits", "lse", "log_rest", "target_logprob"):
        assert torch.equal(getattr(a, t), getattr(b, t)), t
    assert sizes["packed-q5"] < sizes["packed-q5-blosc"]


def test_an_lzma_chunk_is_never_decoded_past_the_formats_size():
    """A forged chunk (right checksum) whose stream inflates far beyond the unit, one that stops short, and one
    that is not lzma are each a DamagedUnitError saying what is wrong; none is decoded past size + 1 byte."""
    import lzma

    import crc32c

    from logitcache.cache import schema
    from logitcache.cache.reader import decode_chunk
    from logitcache.errors import DamagedUnitError

    def chunk(raw: bytes) -> bytes:
        payload = lzma.compress(raw, format=schema.PACKED_LZMA_FORMAT, filters=list(schema.PACKED_LZMA_FILTERS))
        return payload + np.uint32(crc32c.crc32c(payload)).tobytes()

    shape = (7, 10)  # uint16: 140 bytes
    words = np.arange(70, dtype="<u2").reshape(shape)
    shuffled = words.view(np.uint8).reshape(-1, 2).T.tobytes()
    assert np.array_equal(decode_chunk(chunk(shuffled), "uint16", shape, "c", "lzma"), words)
    with pytest.raises(DamagedUnitError, match="c: the lzma stream inflates past the 140 bytes the format needs"):
        decode_chunk(chunk(bytes(1 << 30)), "uint16", shape, "c", "lzma")  # 1 GiB of zeros in ~150 KB
    with pytest.raises(DamagedUnitError, match="holds 139 bytes; the format needs 140"):
        decode_chunk(chunk(shuffled[:-1]), "uint16", shape, "c", "lzma")
    garbage = b"not an lzma stream at all"
    with pytest.raises(DamagedUnitError, match="does not decompress"):
        decode_chunk(garbage + np.uint32(crc32c.crc32c(garbage)).tobytes(), "uint16", shape, "c", "lzma")
