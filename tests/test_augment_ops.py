"""Augmentation ops with explicit params (issue 15): each op against its reference library on fixed params,
purity (same params -> same bytes, here and in another process), odd images, and the deit / tv-v2 recipes."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from logitcache.errors import RecipeError
from logitcache.views.mixing import UnitMixer, mixed_targets
from logitcache.views.ops import color, erasing, geometry, mix, randaugment, trivialaugment
from logitcache.views.params import ArrayParams
from logitcache.views.recipe import Recipe, apply_view, crop_box, eval_view, get_recipe, sample_view
from logitcache.views.rng import view_rng


def _pil(h=37, w=53, seed=0, gray=False) -> Image.Image:
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (h, w, 1 if gray else 3), dtype=np.uint8)
    return Image.fromarray(np.repeat(a, 3, axis=2) if gray else a)


def _tensor(h, w, seed=0, gray=False) -> torch.Tensor:
    return torch.from_numpy(np.array(_pil(h, w, seed, gray))).permute(2, 0, 1)


FILL = (124, 116, 104)


# ------------------------------------------------------------------ each op against its reference
def test_randaugment_ops_equal_timms_on_fixed_params():
    aa = pytest.importorskip("timm.data.auto_augment", reason="timm (dev extra) is the reference implementation")
    assert tuple(aa._RAND_INCREASING_TRANSFORMS) == randaugment.RA_OPS
    img = _pil()
    checked = 0
    for name in randaugment.RA_OPS:
        for m in (0.0, 0.1, 4.5, 8.8, 9.0, 9.5, 10.0):
            for neg in (False, True):
                saved = aa.random.random
                aa.random.random = (lambda: 0.9) if neg else (lambda: 0.1)  # timm negates when random() > 0.5
                try:
                    fn = aa.LEVEL_TO_ARG[name]
                    ref_args = fn(m, {"translate_const": 100, "img_mean": FILL}) if fn else ()
                finally:
                    aa.random.random = saved
                ours = randaugment.level_args(name, m, neg)
                assert tuple(ref_args) == tuple(ours), (name, m, neg)
                got = randaugment.apply_op(img, name, ours, fill=FILL, resample=Image.Resampling.BICUBIC)
                if name == "PosterizeIncreasing" and ours[0] == 0:
                    # Pillow >= 12 refuses 0 bits, so timm raises at magnitude 10; we keep no bit (old Pillow)
                    assert np.asarray(got).max() == 0
                    continue
                ref = aa.NAME_TO_OP[name](img, *ref_args, fillcolor=FILL, resample=Image.Resampling.BICUBIC)
                assert np.array_equal(np.asarray(ref), np.asarray(got)), (name, m, neg)
                checked += 1
    assert checked > 150


def test_randaugment_draws_follow_timms_distribution():
    codes = np.array([randaugment.draw_randaugment(view_rng(0, 0, i)) for i in range(4000)])
    ops, mags = codes[:, 0::2].ravel(), codes[:, 1::2].ravel()
    applied = ops > 0
    assert 0.46 < applied.mean() < 0.54  # p = 0.5 per layer
    op_ids = (ops[applied] & 15) - 1
    assert set(op_ids) == set(range(15))  # uniform over the 15 increasing ops, with replacement
    m = mags[applied] / 10
    assert abs(m.mean() - 9.0) < 0.05 and abs(m.std() - 0.5) < 0.05 and m.max() <= 10.0
    unsigned = {randaugment.RA_OPS.index(n) for n in ("AutoContrast", "Equalize", "Invert", "PosterizeIncreasing",
                                                      "SolarizeIncreasing", "SolarizeAdd")}
    neg = ops[applied] & randaugment.NEG_FLAG > 0
    assert not neg[np.isin(op_ids, list(unsigned))].any()
    assert 0.45 < neg[~np.isin(op_ids, list(unsigned))].mean() < 0.55


def test_trivialaugment_equals_torchvisions_on_fixed_params():
    from torchvision.transforms import v2

    ta = v2.TrivialAugmentWide(interpolation=InterpolationMode.BILINEAR)
    img = _pil(40, 56)
    for op, (name, mags, signed) in enumerate(trivialaugment.TA_OPS):
        for b in (0, 7, 30):
            for neg in (False, True) if signed else (False,):
                m = 0.0 if mags is None else float(mags[b]) * (-1 if neg else 1)
                ref = ta._apply_image_or_video_transform(img, name, m, interpolation=ta.interpolation, fill=ta._fill)
                code = op + (trivialaugment.NEG_FLAG if neg else 0)
                got = trivialaugment.apply_trivialaugment(img, [code, b if mags is not None else 0],
                                                          interpolation=InterpolationMode.BILINEAR)
                assert np.array_equal(np.asarray(ref), np.asarray(got)), (name, b, neg)


def test_colorjitter_equals_torchvisions_functional_ops():
    img = _pil()
    p = color.draw_colorjitter(view_rng(0, 0, 1), brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1)
    order, b, c, s, h = p
    ref = img
    for fn in color.ORDERS[order]:
        ref = [lambda x: F.adjust_brightness(x, b / 1000), lambda x: F.adjust_contrast(x, c / 1000),
               lambda x: F.adjust_saturation(x, s / 1000), lambda x: F.adjust_hue(x, h / 1000)][fn](ref)
    assert np.array_equal(np.asarray(ref), np.asarray(color.apply_colorjitter(img, p)))
    assert color.draw_colorjitter(view_rng(0, 0, 1), hue=0.1) == p
    with pytest.raises(ValueError, match="not valid"):
        color.apply_colorjitter(img, [99, 1000, 1000, 1000, 0])


def test_random_erasing_boxes_and_pinned_noise():
    boxes = [erasing.draw_erasing(view_rng(0, 0, i), 32, p=0.25) for i in range(2000)]
    hit = [b for b in boxes if b[2]]
    assert 0.2 < len(hit) / len(boxes) < 0.3
    for top, left, h, w, seed in hit:
        assert 0 < h < 32 and 0 < w < 32 and top + h <= 32 and left + w <= 32 and 0 <= seed < 2**15
        assert 0.02 * 1024 * 0.8 <= h * w <= 1024 / 3 * 1.2
    n1 = erasing.noise(7, 5, 6, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    n2 = erasing.noise(7, 5, 6, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert n1.shape == (5, 6, 3) and np.array_equal(n1, n2)
    assert not np.array_equal(n1, erasing.noise(8, 5, 6, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
    # the noise is N(mean, std) in [0, 1] units, quantised to uint8 (clipped)
    big = erasing.noise(1, 200, 200, (0.5, 0.5, 0.5), (0.1, 0.1, 0.1)).astype(np.float64) / 255
    assert abs(big.mean() - 0.5) < 0.005 and abs(big.std() - 0.1) < 0.005
    a = np.zeros((8, 8, 3), np.uint8)
    erasing.apply_erasing(a, [1, 2, 3, 4, 0], mode="mean", mean=(0.485, 0.456, 0.406), std=(1, 1, 1))
    assert (a[1:4, 2:6] == np.array([124, 116, 104], np.uint8)).all() and a.sum() == 12 * (124 + 116 + 104)
    with pytest.raises(ValueError, match="does not fit"):
        erasing.apply_erasing(a, [6, 6, 4, 4, 0], mode="mean", mean=(0.5,) * 3, std=(1,) * 3)


def test_mixup_and_cutmix_pixels_and_lambda():
    a = np.full((10, 10, 3), 200, np.uint8)
    b = np.full((10, 10, 3), 10, np.uint8)
    m = mix.apply_mix(a, b, mix.MIX_MIXUP, 64, 0, 0)  # λ = 64/256
    assert (m == (64 * 200 + 192 * 10 + 128) // 256).all()
    assert mix.mix_lambda(mix.MIX_MIXUP, 64, 0, 0, 10) == 0.25
    c = mix.apply_mix(a, b, mix.MIX_CUTMIX, 4, 0, 5)  # side 4 at (0, 5): rows [0, 2), cols [3, 7)
    assert (c[:2, 3:7] == 10).all() and (c == 10).sum() == 2 * 4 * 3
    assert mix.mix_lambda(mix.MIX_CUTMIX, 4, 0, 5, 10) == 1 - 8 / 100  # the box area, as timm's correct_lam
    # timm's rand_bbox gives the same box for the same (λ, centre)
    timm_mixup = pytest.importorskip("timm.data.mixup")
    for lam, cy, cx in ((0.3, 4, 7), (0.9, 0, 9), (0.05, 5, 5)):
        saved = timm_mixup.np.random.randint
        centre = iter((cy, cx))
        timm_mixup.np.random.randint = lambda lo, hi, size=None, _v=centre: next(_v)
        try:
            (yl, yh, xl, xh), lam_t = timm_mixup.cutmix_bbox_and_lam((3, 10, 10), lam)
        finally:
            timm_mixup.np.random.randint = saved
        cut = int(10 * np.sqrt(1 - lam))
        assert mix.cutmix_box(10, cut, cy, cx) == (yl, yh, xl, xh)
        assert mix.mix_lambda(mix.MIX_CUTMIX, cut, cy, cx, 10) == pytest.approx(lam_t)


def test_mixed_targets_are_timms():
    t, p = torch.tensor([1, 2]), torch.tensor([3, 2])
    y = mixed_targets(t, p, torch.tensor([0.25, 0.5]), 5, smoothing=0.1)
    timm_mixup = pytest.importorskip("timm.data.mixup")
    ref0 = timm_mixup.mixup_target(torch.tensor([1, 3]), 5, lam=0.25, smoothing=0.1)[0]
    torch.testing.assert_close(y[0], ref0)
    torch.testing.assert_close(y.sum(1), torch.ones(2))
    assert y[1, 2] == pytest.approx(1 - 0.1 + 0.02)


def test_partners_form_cycles_inside_a_block_and_depend_only_on_the_unit():
    p = mix.block_partners(0, 1, 2, 3, list(range(48, 64)))
    assert sorted(p) == list(range(48, 64)) and sorted(p.values()) == list(range(48, 64))
    assert all(k != v for k, v in p.items())
    assert p == mix.block_partners(0, 1, 2, 3, list(reversed(range(48, 64))))
    assert p != mix.block_partners(0, 2, 2, 3, list(range(48, 64)))
    assert mix.block_partners(0, 1, 2, 3, [5]) == {}


# ------------------------------------------------------------------ recipes
VERSIONS = [("deit", 1), ("deit", 2), ("tv-v2", 1), ("tv-v2", 2)]
ALL_VERSIONS = [*VERSIONS, ("imagenet", 1), ("imagenet", 2), ("imagenet", 3)]  # imagenet: crop + flip only
# (v2: the crop codes; v3: the codes, resized by torch)


@pytest.mark.parametrize("name,version", [*VERSIONS, ("imagenet", 2), ("imagenet", 3)])
def test_recipe_views_apply_twice_to_identical_bytes(name, version):
    r = get_recipe(name, 32, version)
    x = _tensor(45, 60)
    for i in range(40):
        p = sample_view(view_rng(0, 0, i), 45, 60, r)
        assert isinstance(p, ArrayParams) and p.to_array().dtype == np.int16 and len(p.to_array()) == len(
            r.param_fields)
        a = apply_view(x, p, r, key=(0, 0, i))
        b = apply_view(x, r.params_from_array(p.to_array()), r, key=(0, 0, i))
        assert a.dtype == torch.uint8 and a.shape == (3, 32, 32) and torch.equal(a, b)


@pytest.mark.parametrize("name,version", ALL_VERSIONS)
@pytest.mark.parametrize("shape", [(1, 1), (2, 64), (64, 2), (3, 3), (64, 64)])
@pytest.mark.parametrize("gray", [False, True])
def test_tiny_grayscale_and_extreme_aspect_images(name, version, shape, gray):
    r = get_recipe(name, 16, version)
    samples = [_Sample(i, _tensor(*shape, seed=i, gray=gray)) for i in range(5)]
    out = _run_unit(r, samples)
    assert len(out) == 5 and all(o.image.shape == (3, 16, 16) for o in out)
    replay = _run_unit(r, samples, stored=np.stack([o.params for o in out]))
    assert all(torch.equal(a.image, b.image) and a.lam == b.lam for a, b in zip(out, replay, strict=True))
    assert eval_view(samples[0].image, r).shape == (3, 16, 16)


class _Sample:
    def __init__(self, offset, image, label=None):
        self.offset, self.index, self.image, self.label = offset, 1000 + offset, image, offset if label is None \
            else label
        self.where = f"test:{offset}"


def _run_unit(recipe, samples, stored=None, seed=0, epoch=0, shard=0, length=None):
    length = max(s.offset for s in samples) + 1 if length is None and stored is None else length
    m = UnitMixer(recipe, seed=seed, epoch=epoch, shard=shard, stored=stored, length=length)
    out = []
    for s in samples:
        out += m.push(s)
    return out + m.finish()


def test_unit_mixer_labels_and_refusals():
    r = get_recipe("deit", 16, version=1)
    samples = [_Sample(i, _tensor(20, 24, seed=i)) for i in range(20)]  # blocks [0, 16) and [16, 20)
    out = _run_unit(r, samples)
    i_flags, i_partner = r.field_index("flags"), r.field_index("mix_partner")
    for o in out:
        mode, d = (int(o.params[i_flags]) >> 1) & 3, int(o.params[i_partner])
        assert mode in (1, 2) and d != 0 and (o.sample.offset + d) // 16 == o.sample.offset // 16
        assert o.partner_label == o.sample.offset + d and 0 <= o.lam <= 1
    # one decoded sample left in a block: no partner, not mixed
    lone = _run_unit(r, samples[:17])
    assert (int(lone[16].params[i_flags]) >> 1) & 3 == 0 and lone[16].lam == 1.0
    assert torch.equal(lone[16].image, apply_view(samples[16].image, r.params_from_array(lone[16].params), r))
    # a stored partner that is not among the decoded samples (skipped here, not at dump time) is refused
    stored = np.stack([o.params for o in out])
    with pytest.raises(RecipeError, match="not among the decoded samples"):
        _run_unit(r, [s for s in samples if s.offset != out[0].sample.offset + int(out[0].params[i_partner])],
                  stored=stored)


def test_recipe_versions_and_settings_are_checked():
    r = get_recipe("deit")
    assert Recipe.from_json(r.to_json()) == r and r.image_size == 224 and r.mixes and r.version == 2 and r.coded
    v1 = get_recipe("deit", version=1)
    assert Recipe.from_json(v1.to_json()) == v1 and not v1.coded and v1.param_fields != r.param_fields
    with pytest.raises(RecipeError, match="version 3"):
        Recipe.from_json({**r.to_json(), "version": 3})
    with pytest.raises(RecipeError, match="param fields"):  # a v1 cache's fields under the name of v2
        Recipe.from_json({**v1.to_json(), "version": 2})
    with pytest.raises(RecipeError, match="param fields"):
        Recipe.from_json({**r.to_json(), "param_fields": ["top"]})
    with pytest.raises(RecipeError, match="rand-m"):
        Recipe.from_json({**r.to_json(), "randaugment": "rand-m9-mstd0.5"})
    assert not get_recipe("imagenet").mixes and get_recipe("tv-v2").param_fields[5:7] == ("ta_op", "ta_bin")


_CHILD = """
import hashlib, json, sys
import numpy as np, torch
from logitcache.views.recipe import get_recipe
from test_augment_ops import ALL_VERSIONS, _Sample, _jitter_digests, _run_unit, _tensor
out = {}
for name, version in ALL_VERSIONS:
    r = get_recipe(name, 24, version)
    views = _run_unit(r, [_Sample(i, _tensor(30 + i, 40, seed=i)) for i in range(18)], seed=3, epoch=1, shard=2)
    out[f"{name}{version}"] = [hashlib.sha256(v.image.numpy().tobytes() + v.params.tobytes()).hexdigest()
                               for v in views]
out["colorjitter"] = _jitter_digests()
print(json.dumps(out))
"""


def _jitter_digests() -> list[str]:
    img = _pil(24, 30, seed=4)
    out = []
    for i in range(8):
        p = color.draw_colorjitter(view_rng(0, 0, i), brightness=0.4, contrast=0.4, saturation=0.4, hue=0.2)
        out.append(hashlib.sha256(np.asarray(color.apply_colorjitter(img, p)).tobytes() + bytes(str(p), "ascii"))
                   .hexdigest())
    return out


def test_params_to_pixels_identical_in_another_process():
    import os
    here = os.path.dirname(__file__)
    res = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")]),
                              "PYTHONHASHSEED": "123"})
    theirs = json.loads(res.stdout)
    for name, version in ALL_VERSIONS:
        r = get_recipe(name, 24, version)
        views = _run_unit(r, [_Sample(i, _tensor(30 + i, 40, seed=i)) for i in range(18)], seed=3, epoch=1, shard=2)
        ours = [hashlib.sha256(v.image.numpy().tobytes() + v.params.tobytes()).hexdigest() for v in views]
        assert ours == theirs[f"{name}{version}"]
    assert _jitter_digests() == theirs["colorjitter"]


# ------------------------------------------------------------------ version 2: codes on grids, derived seed/partner
def _crop_stats(r, H, W, n=3000) -> np.ndarray:
    """(area fraction, log aspect, top / free height, left / free width, flip, is the centre fallback) of ``n``
    views' crops, each box checked to lie inside the image."""
    out = []
    for i in range(n):
        p = sample_view(view_rng(0, 0, i), H, W, r)
        t, lft, h, w = crop_box(p, r, H, W)
        assert 0 <= t <= H - h and 0 <= lft <= W - w
        fallback = (t, lft, h, w) == geometry._fallback_box(H, W, r.ratio)
        out.append((h * w / (H * W), np.log(w / h), t / max(H - h, 1), lft / max(W - w, 1), p.flip, fallback))
    return np.array(out, dtype=np.float64)


@pytest.mark.parametrize("H,W,cols", [(375, 500, slice(None)), (60, 12, [0, 1, 4, 5])])
def test_imagenet_v2_crop_and_flip_keep_v1s_statistics(H, W, cols):
    """imagenet v2 (crop codes + flip) draws what v1 (torchvision's RandomResizedCrop box) draws, within 0.02 in
    mean and std of area, log aspect, relative position, flip and taking torchvision's centre fallback, over 3000
    views. On 60 x 12 most draws do not fit and ~20 % of the views are the fallback (area, aspect, flip, fallback
    compared); its free ranges are a few pixels, onto which the 64 position codes round with the ends at half
    weight (README "Augmentation recipes"), so positions are compared on the ImageNet-sized image only."""
    v1, v2 = get_recipe("imagenet", 224, 1), get_recipe("imagenet", 224, 2)
    a, b = _crop_stats(v1, H, W)[:, cols], _crop_stats(v2, H, W)[:, cols]
    assert np.abs(a.mean(0) - b.mean(0)).max() < 0.02 and np.abs(a.std(0) - b.std(0)).max() < 0.02
    if W == 12:
        assert 0.1 < a[:, -1].mean() < 0.3
    assert v2.param_fields == ("crop_area", "crop_ratio", "crop_y", "crop_x", "flip") and v2.coded
    assert v1.param_fields == ("top", "left", "height", "width", "flip") and not v1.coded and not v2.augments


def test_v2_grids_are_pinned_and_the_crop_keeps_torchvisions_statistics():
    g = geometry.log_grid(3 / 4, 4 / 3, 16)
    assert len(g) == 16 and g == geometry.log_grid.__wrapped__(3 / 4, 4 / 3, 16)
    for j, v in enumerate(g):  # the midpoints of the log range, computed without exp/log
        assert v == pytest.approx(np.exp(np.log(3 / 4) + (2 * j + 1) / 32 * np.log(16 / 9)), rel=1e-13)
    with pytest.raises(ValueError, match="power of 2"):
        geometry.log_grid(1, 2, 12)
    v1, v2 = get_recipe("deit", 224, 1), get_recipe("deit", 224, 2)
    H, W = 375, 500
    a, b = _crop_stats(v1, H, W), _crop_stats(v2, H, W)
    assert np.abs(a.mean(0) - b.mean(0)).max() < 0.02 and np.abs(a.std(0) - b.std(0)).max() < 0.02
    # too thin for any box of the ratio range: torchvision's centre fallback, stored as its own code
    p = sample_view(view_rng(0, 0, 1), 2, 64, v2)
    assert p.get("crop_area")[0] == geometry.CROP_FALLBACK
    assert geometry.crop_box_from_codes(p.get("crop_area", "crop_ratio", "crop_y", "crop_x"), 2, 64, v2.scale,
                                        v2.ratio) == geometry._fallback_box(2, 64, v2.ratio)
    for bad in ([64, 1, 0, 0], [0, 16, 0, 0], [0, 0, 64, 0], [-1, 0, 0, 0]):
        with pytest.raises(ValueError, match="not valid"):
            geometry.crop_box_from_codes(bad, H, W, v2.scale, v2.ratio)
    with pytest.raises(RecipeError, match="crop codes, not a box"):
        _ = p.top
    with pytest.raises(ValueError, match="does not fit"):  # a large box replayed on a smaller image
        geometry.crop_box_from_codes([63, 8, 0, 0], 20, 20, v2.scale, (1.0, 4.0))


def test_v2_randaugment_applies_the_same_ops_as_v1():
    img = _pil(40, 40, seed=3)
    same = 0
    for i in range(300):
        a = randaugment.draw_randaugment(view_rng(0, 0, i))
        b = randaugment.draw_randaugment(view_rng(0, 0, i), coded=True)
        ops_a = [randaugment.decode_op(c, m) for c, m in zip(a[0::2], a[1::2], strict=True)]
        ops_b = [randaugment.decode_op(c, m, 9.0) for c, m in zip(b[0::2], b[1::2], strict=True)]
        def no_arg(ops):  # AutoContrast / Equalize / Invert take no magnitude (v2 stores none)
            return [o if o is None or o[0] not in randaugment._ARG_FREE else (o[0], 0.0, o[2]) for o in ops]

        assert [o for o in no_arg(ops_a) if o] == [o for o in no_arg(ops_b) if o]  # the applied layers, in order
        assert ops_b == sorted(ops_b, key=lambda o: o is None)  # v2: applied layers first
        assert max(b[1::2]) < 64  # zigzag(tenths - 90): small codes
        if i < 40:
            pa = randaugment.apply_randaugment(img, a, fill=FILL, resample=Image.Resampling.BICUBIC)
            pb = randaugment.apply_randaugment(img, b, fill=FILL, resample=Image.Resampling.BICUBIC, center=9.0)
            assert np.array_equal(np.asarray(pa), np.asarray(pb))
            same += 1
    assert same == 40


def test_v2_erasing_noise_is_keyed_by_the_views_identity():
    r = get_recipe("deit", 32, 2)
    x = _tensor(45, 60)
    erased = [i for i in range(200) if sample_view(view_rng(0, 0, i), 45, 60, r).get("erase_shape")[0]]
    assert 0.15 < len(erased) / 200 < 0.35  # p = 0.25
    p = sample_view(view_rng(0, 0, erased[0]), 45, 60, r)
    box = erasing.box_from_codes(p.get("erase_shape", "erase_y", "erase_x"), 32)
    assert 0 < box[2] < 32 and 0 < box[3] < 32 and box[0] + box[2] <= 32 and box[1] + box[3] <= 32
    a = apply_view(x, p, r, key=(0, 0, 5))
    assert torch.equal(a, apply_view(x, p, r, key=(0, 0, 5)))
    t, lft, h, w = box
    for other in ((1, 0, 5), (0, 1, 5), (0, 0, 6)):  # another seed, epoch or index: other noise, same elsewhere
        b = apply_view(x, p, r, key=other)
        assert not torch.equal(a[:, t:t + h, lft:lft + w], b[:, t:t + h, lft:lft + w])
        mask = torch.ones_like(a, dtype=torch.bool)
        mask[:, t:t + h, lft:lft + w] = False
        assert torch.equal(a[mask], b[mask])
    with pytest.raises(RecipeError, match="seed, epoch, index"):
        apply_view(x, p, r)
    # mean-colour erasing (tv-v2) needs no key
    tv = get_recipe("tv-v2", 32, 2)
    q = next(p for i in range(400) if (p := sample_view(view_rng(0, 0, i), 45, 60, tv)).get("erase_shape")[0])
    assert apply_view(x, q, tv).shape == (3, 32, 32)
    for bad in ([65, 0, 0], [1, 16, 0], [0, 1, 0]):
        with pytest.raises(ValueError, match="not valid"):
            erasing.box_from_codes(bad, 32)


def test_v2_mix_codes_lambda_grid_and_flags():
    a = np.full((16, 16, 3), 200, np.uint8)
    b = np.full((16, 16, 3), 10, np.uint8)
    lam_field, _, _ = mix.fields_from_codes(mix.MIX_MIXUP, [7, 0, 0], 16, "timm")
    assert lam_field == 60 and mix.mix_lambda(mix.MIX_MIXUP, lam_field, 0, 0, 16) == 15 / 64  # (2·7 + 1) / 64
    cut, cy, cx = mix.fields_from_codes(mix.MIX_CUTMIX, [15, 0, 15], 16, "timm")
    assert cut == int(16 * np.sqrt(1 - 31 / 64)) and (cy, cx) == (0, 15)
    assert mix.mix_lambda(mix.MIX_CUTMIX, cut, cy, cx, 16) == 1 - np.prod(
        [hi - lo for lo, hi in zip(mix.cutmix_box(16, cut, cy, cx)[::2], mix.cutmix_box(16, cut, cy, cx)[1::2],
                                   strict=True)]) / 256
    assert (mix.apply_mix(a, b, mix.MIX_CUTMIX, cut, cy, cx) == 10).any()
    assert mix.fields_from_codes(mix.MIX_CUTMIX, [0, 0, 0], 16, "torchvision")[0] % 2 == 0
    for bad in ([32, 0, 0], [0, 16, 0], [-1, 0, 0]):
        with pytest.raises(ValueError, match="not valid"):
            mix.fields_from_codes(mix.MIX_CUTMIX, bad, 16, "timm")
    for flip in (False, True):
        for mode in (mix.MIX_NONE, mix.MIX_MIXUP, mix.MIX_CUTMIX):
            for coded in (False, True):
                assert mix.decode_mode(mix.encode_flags(flip, mode, coded), coded) == mode
    with pytest.raises(ValueError, match="not valid"):
        mix.decode_mode(6, True)
    # λ keeps the distribution of the continuous draw (Beta(0.8, 0.8) Mixup, Beta(1, 1) CutMix)
    lam = {1: [], 2: []}
    for version in (1, 2):
        r = get_recipe("deit", 224, version)
        for i in range(3000):
            p = sample_view(view_rng(0, 0, i), 300, 400, r).to_array()
            i_lam = r.field_index("mix_lam")
            lam_field, cy, cx = (p[i_lam:i_lam + 3] if version == 1 else
                                 mix.fields_from_codes(mix.decode_mode(p[4], True), p[i_lam:i_lam + 3], 224, "timm"))
            lam[version].append(mix.mix_lambda(mix.decode_mode(p[4], version == 2), int(lam_field), int(cy), int(cx),
                                               224))
    assert abs(np.mean(lam[1]) - np.mean(lam[2])) < 0.02 and abs(np.std(lam[1]) - np.std(lam[2])) < 0.02


def test_v2_partner_comes_from_the_unit_and_a_skipped_partner_is_refused_or_unmixed():
    r = get_recipe("deit", 16, 2)
    samples = [_Sample(i, _tensor(20, 24, seed=i)) for i in range(20)]  # blocks [0, 16) and [16, 20)
    out = _run_unit(r, samples, seed=2, epoch=1, shard=3, length=20)
    cycles = {**mix.cycle_partners(2, 1, 3, 0, 16, 20), **mix.cycle_partners(2, 1, 3, 1, 16, 20)}
    for o in out:
        assert mix.decode_mode(o.params[r.field_index("flags")], True) in (mix.MIX_MIXUP, mix.MIX_CUTMIX)
        assert o.partner_label == cycles[o.sample.offset] != o.sample.offset and 0 <= o.lam <= 1
    stored = np.stack([o.params for o in out])
    replay = _run_unit(r, samples, stored=stored, seed=2, epoch=1, shard=3)
    assert all(torch.equal(a.image, b.image) and a.lam == b.lam and a.partner_label == b.partner_label
               for a, b in zip(out, replay, strict=True))
    # replayed where a partner is missing now: refused, never mixed with another view
    gone = cycles[0]
    with pytest.raises(RecipeError, match="not among the decoded samples"):
        _run_unit(r, [s for s in samples if s.offset != gone], stored=stored, seed=2, epoch=1, shard=3)
    # drawn with a sample skipped (corrupt): the view whose partner it was is not mixed; replay agrees
    skip = [s for s in samples if s.offset != gone]
    drawn = _run_unit(r, skip, seed=2, epoch=1, shard=3, length=20)
    lone = next(o for o in drawn if o.sample.offset == 0)
    assert mix.decode_mode(lone.params[r.field_index("flags")], True) == mix.MIX_NONE and lone.lam == 1.0
    rows = np.zeros((20, len(r.param_fields)), np.int16)
    for o in drawn:
        rows[o.sample.offset] = o.params
    again = _run_unit(r, skip, stored=rows, seed=2, epoch=1, shard=3)
    assert all(torch.equal(a.image, b.image) for a, b in zip(drawn, again, strict=True))
    with pytest.raises(ValueError, match="length"):
        UnitMixer(r, seed=0, epoch=0, shard=0)


def test_grid_position_gives_a_narrow_range_uniform_weight():
    """The 64 position codes spread over a free range of a few pixels give each position an equal share (±1 code),
    as torchvision's uniform integer pick does; over a wide range they reach both ends' neighbourhood evenly."""
    from collections import Counter

    from logitcache.views.ops.geometry import grid_position

    for free in range(0, 70):
        counts = Counter(grid_position(c, free, 64) for c in range(64))
        assert set(counts) <= set(range(free + 1))
        if free < 64:
            assert set(counts) == set(range(free + 1)), free
            assert max(counts.values()) - min(counts.values()) <= 1, (free, counts)
    wide = [grid_position(c, 500, 64) for c in range(64)]
    assert wide == sorted(set(wide)) and wide[0] <= 500 / 64 and wide[-1] >= 500 - 500 / 64
    assert abs(sum(wide) / 64 - 250) < 1  # centred: no drift towards either end
