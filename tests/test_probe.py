"""`logitcache probe` (issue 16 item 4): the table's structure, exactness at k = C, the recommendation rule, the
views it draws, and clear errors. A smallcnn teacher with weights made here, 24 views of 28 px, C = 10."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from logitcache.cache import fidelity
from logitcache.cli import main
from logitcache.models.zoo import build_model
from logitcache.probe import (
    NEAR_TIE,
    ProbeConfig,
    ProbeError,
    _complexity,
    collect_views,
    probe,
    recommend,
    recommend_in_expectation,
)

C = 10
GRADS = ("grad_relerr_kd_T4", "grad_relerr_dkd_T1", "grad_relerr_nkd_T1")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A smallcnn made confident (classifier scaled), so k matters: its mean top-1 probability is ~0.9."""
    torch.manual_seed(11)
    model = build_model("smallcnn", C)
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.weight.mul_(20.0)
    path = tmp_path_factory.mktemp("probe_teacher") / "smallcnn.pt"
    torch.save(model.state_dict(), path)
    return str(path)


def _cfg(data, weights, **kw) -> ProbeConfig:
    base = dict(data=str(data), teacher="smallcnn", weights=weights, recipe="small", image_size=28, views=24,
                batch_size=8, ks=(1, 5, 20), temperatures=(1.0, 4.0))
    return ProbeConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def report(small_shards, weights):
    return probe(_cfg(small_shards, weights))


def test_the_table_has_every_k_and_setting(report):
    assert report["views"] == 24 and report["num_classes"] == C
    ks = [1, 5, C]  # 20 is clipped to C
    settings = ["format 1 (fp16)", "format 2", "format 2 prior", "format 2 sampled:8"]
    assert [(r["k"], r["setting"]) for r in report["rows"]] == [(k, s) for k in ks for s in settings]
    masses = [report["mean_topk_mass"][str(k)] for k in ks]
    assert masses == sorted(masses) and masses[0] < 0.99 and masses[-1] == pytest.approx(1.0)
    for r in report["rows"]:
        assert r["dump_bytes_per_view"] > 0 and r["kl_T1"] >= 0
        assert all(r[g] >= 0 for g in GRADS)
        assert (r["prior_bytes"] > 0) == (r["tail"] == "prior")
        assert r["dump_flags"].startswith(f"--topk {r['k']} --temperatures 1,4")
    # k = 1 of a confident-but-not-certain teacher: the uniform tail is visibly wrong, more k helps
    k1 = {r["setting"]: r for r in report["rows"] if r["k"] == 1}
    k5 = {r["setting"]: r for r in report["rows"] if r["k"] == 5}
    assert k5["format 2"]["grad_relerr_nkd_T1"] < k1["format 2"]["grad_relerr_nkd_T1"]
    assert k1["format 2"]["dump_bytes_per_view"] < k5["format 2"]["dump_bytes_per_view"]


def test_k_equal_to_c_is_exact_up_to_the_codec_step(report):
    full = [r for r in report["rows"] if r["k"] == C]
    for r in full:
        assert r["kl_T1"] < 1e-3, r
        # format 1 stores float16 values; format 2 steps of 2^-5 nats (top-1) / 2^-4 (others): ~1 % at most
        bound = 1e-3 if r["format"] == 1 else 2.0 ** -5
        assert all(r[g] < bound for g in GRADS), r


def test_the_recommendation_is_the_cheapest_row_meeting_the_target(report):
    rows = report["rows"]
    errors = sorted(r["grad_relerr_nkd_T1"] for r in rows)
    for target in (errors[len(errors) // 2], errors[-1], report["target_grad_error"]):
        rec = recommend(rows, target)["recommendation"]
        ok = [r for r in rows if r["grad_relerr_nkd_T1"] <= target]
        cheapest = min(r["ranked_bytes_per_view"] for r in ok)
        chosen = next(r for r in ok if (r["k"], r["setting"]) == (rec["k"], rec["setting"]))
        assert rec["grad_relerr_nkd_T1"] <= target
        assert chosen["ranked_bytes_per_view"] <= cheapest * (1 + NEAR_TIE)
        # a cheaper row meeting the target is never a simpler setting
        assert all(_complexity(r) >= _complexity(chosen) for r in ok
                   if r["ranked_bytes_per_view"] < chosen["ranked_bytes_per_view"])
    none = recommend(rows, errors[0] / 2)
    assert none["recommendation"] is None and none["closest"]["grad_relerr_nkd_T1"] == errors[0]


def test_near_ties_go_to_the_simpler_setting():
    def row(setting, fmt, tail, k, size, err):
        return {"setting": setting, "format": fmt, "tail": tail, "k": k, "ranked_bytes_per_view": size,
                "dump_bytes_per_view": size, "prior_bytes": 0, "grad_relerr_nkd_T1": err, "kl_T1": 0.0,
                "dump_flags": ""}

    prior = row("format 2 prior", 2, "prior", 10, 13.71, 0.01)
    for uniform_bytes, expected in ((13.73, "format 2"), (14.5, "format 2 prior")):
        rows = [prior, row("format 2", 2, "uniform", 10, uniform_bytes, 0.01),
                row("format 1 (fp16)", 1, "uniform", 5, 13.0, 0.03)]  # cheapest, but misses the target
        assert recommend(rows, 0.02)["recommendation"]["setting"] == expected


def test_the_probe_draws_the_first_views_in_shard_order(small_shards, weights):
    """15 views = the first 15 of the 24 (all of shard 0, then shard 1's first 3), stopping early."""
    a = collect_views(_cfg(small_shards, weights, views=15))
    b = collect_views(_cfg(small_shards, weights, views=24))
    assert a.logits.shape == (15, C) and torch.equal(a.logits, b.logits[:15])
    assert torch.equal(a.target, b.target[:15]) and (a.params == b.params[:15]).all()


def test_the_cli_prints_the_table_and_says_when_nothing_meets_the_target(small_shards, weights):
    args = ["probe", "--teacher", "smallcnn", "--weights", weights, "--data", str(small_shards), "--recipe", "small",
            "--image-size", "28", "--views", "16", "--ks", "1,3", "--workers", "0"]
    res = CliRunner().invoke(main, [*args, "--target-grad-error", "1e-9"])
    assert res.exit_code == 0, res.output
    assert "NO setting measured meets --target-grad-error 1e-09" in res.output and "Closest: k = 3" in res.output
    assert "NKD exp." in res.output
    res = CliRunner().invoke(main, [*args, "--target-grad-error", "10", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["recommendation"]["k"] == 1 and out["closest"] is None  # anything meets 1000 %: the cheapest k


@pytest.mark.parametrize("extra, message", [
    (["--views", "2"], "--views must be >= 4"),
    (["--ks", "1,x"], "--ks must be comma-separated integers"),
    (["--ks", "0"], "--ks must be positive"),
    (["--target-grad-error", "0"], "--target-grad-error must be > 0"),
    (["--shards", "7"], "shard"),
    (["--teacher", "nosuchnet"], "nosuchnet"),
    (["--views", "6000000"], "more dense logits than the probe keeps"),
    (["--tail", "oracle"], "--tail: unknown tail 'oracle'"),
    (["--draws", "1"], "--draws must be 0 (one draw only) or >= 2"),
])
def test_bad_input_is_a_clear_error(small_shards, weights, extra, message):
    args = ["probe", "--teacher", "smallcnn", "--weights", weights, "--data", str(small_shards), "--recipe", "small",
            "--image-size", "28", *extra]
    res = CliRunner().invoke(main, args)
    assert res.exit_code != 0 and message in res.output, res.output
    assert "Traceback" not in res.output and not isinstance(res.exception, (TypeError, AttributeError, KeyError))


def test_a_missing_data_set_names_it(tmp_path, weights):
    res = CliRunner().invoke(main, ["probe", "--teacher", "smallcnn", "--weights", weights, "--data",
                                    str(tmp_path / "nothing"), "--recipe", "small"])
    assert res.exit_code == 1 and "nothing" in res.output and "Traceback" not in res.output


def test_probe_config_refuses_bad_settings_without_running(small_shards, weights):
    with pytest.raises(ProbeError, match="tail-samples"):
        _cfg(small_shards, weights, tail_samples=0)
    assert fidelity.sampled(4).dump_flags == "--tail sampled:4" and fidelity.FORMAT_1.dump_flags == "--format 1"


def test_tail_selects_the_format_2_rules_measured(small_shards, weights):
    """`--tail` names the rules as `dump --tail` does; format 1 stays as the reference; bare `sampled` takes M from
    --tail-samples."""
    cfg = _cfg(small_shards, weights, tails=("prior", "sampled:3"))
    assert [s.label for s in cfg.settings] == [fidelity.FORMAT_1.label, fidelity.FORMAT_2_PRIOR.label,
                                             fidelity.sampled(3).label]
    assert _cfg(small_shards, weights, tails=("sampled",), tail_samples=5).settings[-1] == fidelity.sampled(5)
    args = ["probe", "--teacher", "smallcnn", "--weights", weights, "--data", str(small_shards), "--recipe", "small",
            "--image-size", "28", "--views", "16", "--ks", "3", "--workers", "0", "--tail", "uniform", "--json"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert {row["setting"] for row in json.loads(res.output)["rows"]} == {fidelity.FORMAT_1.label,
                                                                         fidelity.FORMAT_2.label}


def test_sampled_rows_carry_their_error_in_expectation(report):
    """The mean gradient over fresh tail draws is far closer to the dense one than one draw where the tail matters
    (k = 1: 9 tail classes, 8 draws); deterministic rows have no such figure (theirs is the one-draw error)."""
    for r in report["rows"]:
        assert ("expected_relerr_nkd_T1" in r) == r["setting"].startswith("format 2 sampled"), r["setting"]
    k1 = next(r for r in report["rows"] if r["k"] == 1 and r["setting"] == "format 2 sampled:8")
    assert k1["draws"] == 256 and k1["draw_views"] == 24
    assert k1["expected_relerr_nkd_T1"] < 0.5 * k1["grad_relerr_nkd_T1"], k1
    assert 0 < k1["mc_floor_nkd_T1"] < k1["grad_relerr_nkd_T1"]


def test_a_sampled_tail_is_offered_in_expectation_only_when_it_is_cheaper():
    def row(setting, tail, size, err, expected=None):
        r = {"setting": setting, "format": 2, "tail": tail, "k": 10, "ranked_bytes_per_view": size,
             "dump_bytes_per_view": size, "prior_bytes": 0, "grad_relerr_nkd_T1": err, "kl_T1": 0.0,
             "dump_flags": ""}
        if expected is not None:
            r.update(expected_relerr_nkd_T1=expected, mc_floor_nkd_T1=expected / 3, draws=256, draw_views=500)
        return r

    sampled = row("format 2 sampled:4", "sampled:4", 31.0, 0.21, expected=0.015)
    uniform = row("format 2", "uniform", 23.5, 0.073)
    # nothing meets 2 % per draw: the sampled tail is offered in expectation
    assert recommend(rows := [uniform, sampled], 0.02)["recommendation"] is None
    got = recommend_in_expectation(rows, 0.02, None)
    assert got["setting"] == "format 2 sampled:4" and got["expected_relerr_nkd_T1"] == 0.015
    # a cheaper deterministic setting meets the target: nothing more to offer
    cheap = row("format 2", "uniform", 20.0, 0.01)
    assert recommend_in_expectation([cheap, sampled], 0.02, recommend([cheap, sampled], 0.02)["recommendation"]) is None
    # a dearer one meets it: the cheaper sampled tail is offered next to it
    dear = row("format 2", "uniform", 40.0, 0.01)
    rec = recommend([dear, sampled], 0.02)["recommendation"]
    assert rec["setting"] == "format 2" and recommend_in_expectation([dear, sampled], 0.02, rec)["k"] == 10
    # its expected error misses the target: none
    assert recommend_in_expectation([uniform, row("s", "sampled:2", 27.0, 0.3, expected=0.05)], 0.02, None) is None


def test_codecs_are_measured_with_each_tail_and_recommended_with_their_dump_flags(small_shards, weights):
    """`--codecs` adds format 2's other value codings (named as `dump --codec` takes them) to every tail rule;
    their rows carry the flags that write them."""
    with pytest.raises(ProbeError, match="codecs"):
        _cfg(small_shards, weights, codecs=("packed-q4-r9",))
    cfg = _cfg(small_shards, weights, ks=(5,), tails=("uniform", "prior"), codecs=("packed-q6", "packed-q4-knee4"),
               draws=0)
    out = probe(cfg)
    rows = {r["setting"]: r for r in out["rows"]}
    assert list(rows) == ["format 1 (fp16)", "format 2", "format 2 prior", "format 2 packed-q4-knee4",
                          "format 2 prior packed-q4-knee4"]
    assert rows["format 2 packed-q4-knee4"]["codec"] == "packed-q4-knee4"
    assert rows["format 2 prior packed-q4-knee4"]["dump_flags"] == "--topk 5 --temperatures 1,4 --tail prior " \
                                                                   "--codec packed-q4-knee4"
    assert rows["format 2"]["dump_flags"] == "--topk 5 --temperatures 1,4"
    assert fidelity.FORMAT_2_SMALL.dump_flags == "--codec packed-q4-knee4"
