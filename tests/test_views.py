"""Replayable views: pure sampling from (seed, epoch, index), exact application, torchvision equivalence."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
import torchvision.transforms.v2.functional as TV2
import torchvision.transforms.v2.functional._geometry as tv2_geometry
from PIL import Image

from logitcache.errors import RecipeError
from logitcache.views.ops.geometry import crop_box_from_codes, normalize
from logitcache.views.params import ViewParams
from logitcache.views.recipe import Recipe, apply_view, crop_box, eval_view, get_recipe, sample_view, view_source
from logitcache.views.rng import view_rng

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")


def _image(h, w, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)


def _pil(x: torch.Tensor) -> Image.Image:
    return Image.fromarray(x.permute(1, 2, 0).contiguous().numpy())


def _tensor(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(im)).permute(2, 0, 1)


# ------------------------------------------------------------------ sampling
def test_view_rng_is_a_pure_function_of_seed_epoch_index():
    a = view_rng(3, 1, 12345).integers(0, 2**31, 8)
    b = view_rng(3, 1, 12345).integers(0, 2**31, 8)
    np.testing.assert_array_equal(a, b)
    others = [view_rng(*t).integers(0, 2**31, 8) for t in ((4, 1, 12345), (3, 2, 12345), (3, 1, 12346), (1, 3, 12345))]
    assert all(not np.array_equal(a, o) for o in others)
    assert np.array_equal(view_rng(np.int64(3), np.int32(1), np.uint64(12345)).integers(0, 2**31, 8), a)
    with pytest.raises(ValueError, match="index"):
        view_rng(0, 0, -1)


@pytest.mark.parametrize("version", [1, 2])
def test_imagenet_boxes_follow_random_resized_crop_bounds(version):
    r = get_recipe("imagenet", 64, version=version)
    H, W = 375, 500
    flips = 0
    for i in range(300):
        p = sample_view(view_rng(0, 0, i), H, W, r)
        top, left, h, w = crop_box(p, r, H, W)  # v1: the stored box; v2: the box of the stored codes
        assert 0 <= top and 0 <= left and top + h <= H and left + w <= W
        # rounding of w and h moves area and ratio a little off the drawn values
        area = h * w / (H * W)
        assert 0.08 * 0.9 <= area <= 1.0
        assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1
        flips += p.flip
    assert 100 < flips < 200  # p = 0.5 over 300 draws (a 6-sigma band)


@pytest.mark.parametrize("version", [1, 2])
def test_imagenet_fallback_is_torchvisions_center_crop(version):
    r = get_recipe("imagenet", 32, version=version)
    # height 10, width 400: no attempt can fit (h >= sqrt(0.08*4000*3/4) > 10), so the fallback runs
    p = sample_view(view_rng(0, 0, 0), 10, 400, r)
    w = int(round(10 * 4 / 3))
    assert crop_box(p, r, 10, 400) == (0, (400 - w) // 2, 10, w)
    p = sample_view(view_rng(0, 0, 0), 400, 10, r)
    h = int(round(10 / (3 / 4)))
    assert crop_box(p, r, 400, 10) == ((400 - h) // 2, 0, h, 10)
    if version == 1:
        assert (p.top, p.left, p.height, p.width) == ((400 - h) // 2, 0, h, 10)
    else:  # the fallback's code: crop_area 64, the other codes 0
        assert p.to_array().tolist() == [64, 0, 0, 0, int(p.flip)]


def test_small_params_are_pad_crop_offsets():
    r = get_recipe("small")
    seen = set()
    for i in range(200):
        p = sample_view(view_rng(1, 0, i), 28, 28, r)
        assert (p.height, p.width) == (28, 28) and -4 <= p.top <= 4 and -4 <= p.left <= 4
        seen.add((p.top, p.left))
    assert len(seen) > 40  # offsets spread over the 9x9 grid


# ------------------------------------------------------------------ applying
@pytest.mark.parametrize("version", [1, 2])
def test_imagenet_view_equals_torchvision_on_pil_images(version):
    r = get_recipe("imagenet", 48, version=version)
    for i in range(12):
        x = _image(40 + 3 * i, 90 - 2 * i, seed=i)
        p = sample_view(view_rng(7, 2, i), x.shape[1], x.shape[2], r)
        if version == 1:  # torchvision's RandomResizedCrop box, stored as is
            box = (p.top, p.left, p.height, p.width)
        else:  # the box of the codes: our one function of codes + image size
            box = crop_box_from_codes(p.get("crop_area", "crop_ratio", "crop_y", "crop_x"), *x.shape[1:],
                                      r.scale, r.ratio)
        ref = TF.resized_crop(_pil(x), *box, [48, 48],
                              interpolation=TF.InterpolationMode.BILINEAR)
        if p.flip:
            ref = TF.hflip(ref)
        y = apply_view(x, p, r)
        assert y.dtype == torch.uint8 and y.shape == (3, 48, 48)
        assert torch.equal(y, _tensor(ref)), (i, p)


def test_imagenet_v3_view_equals_torchvision_v2_on_uint8_tensors(monkeypatch):
    """v3 = v2's crop codes, the crop resized by torch on the uint8 tensor: torchvision v2's resized_crop
    (antialias) + hflip on the same tensor, byte for byte, for contiguous and channels-last (decoded) images;
    within 1 grey level of v2's Pillow pixels (same box), and not equal to them (another recipe version).
    torchvision resizes uint8 natively on AVX2/AVX512 and ARM CPUs and converts to float on other x86 ones; v3
    always takes the native kernel, so the reference is torchvision's native path on any CI machine."""
    monkeypatch.setattr(tv2_geometry, "_do_native_uint8_resize_on_cpu", lambda interpolation: True)
    r3, r2 = get_recipe("imagenet", 48), get_recipe("imagenet@2", 48)
    assert (r3.version, r3.interpolation, r3.torch_mode) == (3, "bilinear-antialias-torch", "bilinear")
    differ = 0
    for i in range(12):
        x = _image(40 + 3 * i, 90 - 2 * i, seed=i)
        if i % 2:
            x = x.permute(1, 2, 0).contiguous().permute(2, 0, 1)
        p = sample_view(view_rng(7, 2, i), x.shape[1], x.shape[2], r3)
        assert p.to_array().tolist() == sample_view(view_rng(7, 2, i), *x.shape[1:], r2).to_array().tolist()
        box = crop_box_from_codes(p.get("crop_area", "crop_ratio", "crop_y", "crop_x"), *x.shape[1:],
                                  r3.scale, r3.ratio)
        ref = TV2.resized_crop(x, *box, [48, 48], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        if p.flip:
            ref = TV2.horizontal_flip(ref)
        y = apply_view(x, p, r3)
        assert y.dtype == torch.uint8 and y.shape == (3, 48, 48) and y.is_contiguous()
        assert torch.equal(y, ref), (i, p)
        pillow = apply_view(x, p, r2)
        assert int((y.int() - pillow.int()).abs().max()) <= 1
        differ += int((y != pillow).sum())
    assert differ > 0


_CAPABILITY_PROBE = """
import hashlib, sys, torch
from logitcache.views.recipe import apply_view, eval_view, get_recipe, sample_view
from logitcache.views.rng import view_rng
torch.set_num_threads(int(sys.argv[1]))
h = hashlib.sha256()
for name, size in (("imagenet", 56), ("imagenet", 224), ("imagenet@2", 56)):
    r = get_recipe(name, size)
    for i in range(12):
        g = torch.Generator().manual_seed(i)
        H, W = 30 + 37 * i, 400 - 29 * i
        x = torch.randint(0, 256, (H, W, 3), dtype=torch.uint8, generator=g).permute(2, 0, 1)  # decoded layout
        for e in range(3):
            h.update(apply_view(x, sample_view(view_rng(1, e, i), H, W, r), r).numpy().tobytes())
        h.update(eval_view(x, r).numpy().tobytes())
print(torch.backends.cpu.get_cpu_capability(), h.hexdigest())
"""


def test_views_are_the_same_bytes_on_every_cpu_kernel():
    """Why a v3 cache dumped on an x86 GPU node replays on an ARM one (or the reverse): torch's uint8 antialiased
    resize gives the same bytes from its generic kernel (ATEN_CPU_CAPABILITY=default, what ARM CPUs run) as from
    this CPU's vector kernels, with 1 or 2 threads. A torch that broke this would fail here (and its replays
    would fail the cache's view digests)."""
    def run(env_extra, threads):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), **env_extra}
        out = subprocess.run([sys.executable, "-c", _CAPABILITY_PROBE, str(threads)], env=env, capture_output=True,
                             text=True, timeout=120, check=True).stdout.split()
        return out[0], out[1]
    native = run({}, 2)
    generic = run({"ATEN_CPU_CAPABILITY": "default"}, 1)
    assert generic[0] == "DEFAULT"
    assert generic[1] == native[1], f"{native[0]} and DEFAULT kernels give different views"


def test_flip_mirrors_the_view():
    r = get_recipe("imagenet", 32, version=1)
    x = _image(50, 60)
    p = ViewParams(3, 4, 40, 50, False)
    assert torch.equal(apply_view(x, ViewParams(3, 4, 40, 50, True), r), apply_view(x, p, r).flip(-1))
    r2 = get_recipe("imagenet", 32)
    codes = [20, 5, 10, 50]
    assert torch.equal(apply_view(x, r2.params_from_array([*codes, 1]), r2),
                       apply_view(x, r2.params_from_array([*codes, 0]), r2).flip(-1))


def test_small_view_is_pad_then_crop():
    r = get_recipe("small")
    x = _image(28, 28, seed=3)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))  # zero padding
    for top, left in ((-4, -4), (4, 4), (-2, 3), (0, 0)):
        y = apply_view(x, ViewParams(top, left, 28, 28, False), r)
        assert torch.equal(y, padded[:, top + 4 : top + 32, left + 4 : left + 32])
    assert torch.equal(apply_view(x, ViewParams(0, 0, 28, 28, False), r), x)
    assert torch.equal(apply_view(x, ViewParams(1, -1, 28, 28, True), r),
                       apply_view(x, ViewParams(1, -1, 28, 28, False), r).flip(-1))


def test_small_view_resizes_only_when_the_source_differs():
    r = get_recipe("small", 28)
    x = _image(32, 32, seed=4)
    y = apply_view(x, ViewParams(2, -3, 32, 32, False), r)
    window = torch.nn.functional.pad(x, (4, 4, 4, 4))[:, 6:38, 1:33]
    assert torch.equal(y, _tensor(_pil(window).resize((28, 28), Image.Resampling.BILINEAR)))


def test_params_that_do_not_fit_the_image_are_refused():
    x = _image(40, 50)
    with pytest.raises(RecipeError, match="does not fit a 40x50"):
        apply_view(x, ViewParams(10, 0, 40, 20, False), get_recipe("imagenet", 32, version=1))
    r2 = get_recipe("imagenet", 32)
    with pytest.raises(RecipeError, match="does not fit a 5x400"):  # area code 63 ~ 99 % of 2000 px: 40 px high
        apply_view(_image(5, 400), r2.params_from_array([63, 8, 0, 0, 0]), r2)
    with pytest.raises(RecipeError, match="not valid"):
        apply_view(x, r2.params_from_array([0, 16, 0, 0, 0]), r2)
    with pytest.raises(RecipeError, match="crop codes"):  # a v1 box given to v2
        apply_view(x, ViewParams(0, 0, 28, 28, False), r2)
    with pytest.raises(RecipeError, match="does not fit"):
        apply_view(x, ViewParams(0, 0, 28, 28, False), get_recipe("small"))
    with pytest.raises(RecipeError, match="does not fit"):
        apply_view(_image(28, 28), ViewParams(5, 0, 28, 28, False), get_recipe("small"))
    with pytest.raises(RecipeError, match="uint8"):
        apply_view(x.float(), ViewParams(0, 0, 10, 10, False), get_recipe("imagenet", 32, version=1))


def test_eval_view_is_resize_then_center_crop(monkeypatch):
    monkeypatch.setattr(tv2_geometry, "_do_native_uint8_resize_on_cpu", lambda interpolation: True)  # see above
    r = get_recipe("imagenet@2", 56)  # resize the shorter side to floor(56 / 0.875) = 64
    r3 = get_recipe("imagenet", 56)  # v3: the same with torch's resize of the uint8 tensor
    for h, w in ((40, 90), (90, 41), (64, 64)):
        x = _image(h, w, seed=h)
        ref = TF.center_crop(TF.resize(_pil(x), 64, interpolation=TF.InterpolationMode.BILINEAR), 56)
        assert torch.equal(eval_view(x, r), _tensor(ref))
        ref3 = TV2.center_crop(TV2.resize(x, [64], interpolation=TF.InterpolationMode.BILINEAR, antialias=True), 56)
        assert torch.equal(eval_view(x, r3), ref3)
    small = _image(28, 28)
    assert torch.equal(eval_view(small, get_recipe("small")), small)
    assert eval_view(small, get_recipe("small", 32)).shape == (3, 32, 32)


def test_normalize():
    x = torch.tensor([[[[0, 255]], [[51, 102]], [[255, 0]]]], dtype=torch.uint8)  # (1, 3, 1, 2)
    y = normalize(x, [0.5, 0.2, 0.5], [0.5, 0.2, 0.25])
    expected = torch.tensor([[[[-1.0, 1.0]], [[0.0, 1.0]], [[2.0, -2.0]]]])
    assert y.dtype == torch.float32 and torch.allclose(y, expected, atol=1e-6)
    assert normalize(x[0], [0.5] * 3, [0.5] * 3).shape == (3, 1, 2)


# ------------------------------------------------------------------ serialisation
def test_view_params_array_round_trip():
    r = get_recipe("imagenet", version=1)
    p = ViewParams(-3, 17, 300, 250, True)
    a = p.to_array()
    assert a.dtype == np.int16 and a.tolist() == [-3, 17, 300, 250, 1]
    assert ViewParams.from_array(r, a) == p
    assert len(r.param_fields) == a.shape[0]
    with pytest.raises(RecipeError, match="int16"):
        ViewParams(0, 0, 40000, 10, False).to_array()
    with pytest.raises(RecipeError, match="expected"):
        ViewParams.from_array(r, [1, 2, 3])


def test_recipe_json_round_trip_and_refusals():
    for name in ("imagenet", "imagenet@1", "small"):
        r = get_recipe(name, 40)
        d = json.loads(json.dumps(r.to_json()))
        assert Recipe.from_json(d) == r
    assert "pad" not in get_recipe("imagenet").to_json() and "scale" not in get_recipe("small").to_json()
    assert get_recipe("imagenet").image_size == 224 and get_recipe("small").image_size == 28
    assert get_recipe("imagenet").version == 3 and get_recipe("imagenet@1").version == 1
    d = get_recipe("imagenet", version=1).to_json()
    with pytest.raises(RecipeError, match="version 9"):
        Recipe.from_json({**d, "version": 9})
    with pytest.raises(RecipeError, match="param fields"):  # v1's fields under v2's number: not replayed as v2
        Recipe.from_json({**d, "version": 2})
    with pytest.raises(RecipeError, match="param fields"):
        Recipe.from_json({**get_recipe("imagenet").to_json(), "version": 1})
    with pytest.raises(RecipeError, match="must be a number"):
        get_recipe("imagenet@two")
    with pytest.raises(RecipeError, match="version 9"):
        get_recipe("imagenet@9")
    v3 = get_recipe("imagenet").to_json()
    with pytest.raises(RecipeError, match="not implemented"):  # v3 is torch's resize, v2 Pillow's: not swapped
        Recipe.from_json({**v3, "interpolation": "bilinear-antialias-pillow"})
    with pytest.raises(RecipeError, match="not implemented"):
        Recipe.from_json({**get_recipe("imagenet@2").to_json(), "interpolation": "bilinear-antialias-torch"})
    with pytest.raises(RecipeError, match="disagree"):
        get_recipe("imagenet@1", version=2)
    with pytest.raises(RecipeError, match="does not know"):
        Recipe.from_json({**d, "color_jitter": 0.4})
    with pytest.raises(RecipeError, match="unknown recipe"):
        get_recipe("autoaugment")
    with pytest.raises(RecipeError, match="malformed"):
        Recipe.from_json({"name": "small", "image_size": 28})  # no version
    with pytest.raises(RecipeError, match="interpolation"):
        Recipe.from_json({**d, "interpolation": "bicubic"})


# ------------------------------------------------------------------ replay in another process
_REPLAY = r"""
import hashlib, json, sys
import torch
from logitcache.data import iter_shard, load_manifest
from logitcache.views import apply_view, get_recipe, sample_view, view_rng

def replay(path):
    m = load_manifest(path)
    out = {}
    for name, size in (("imagenet", 32), ("imagenet@1", 32), ("small", 24)):
        r = get_recipe(name, size)
        for s in range(len(m.shards)):
            for sample in iter_shard(m, s):
                for epoch in (0, 5):
                    p = sample_view(view_rng(11, epoch, sample.index), *sample.image.shape[1:], r)
                    x = apply_view(sample.image, p, r)
                    digest = hashlib.sha256(x.numpy().tobytes()).hexdigest()
                    out[f"{name}/{epoch}/{sample.index}"] = [p.to_array().tolist(), digest]
    return out
"""


def test_same_seed_epoch_index_give_the_same_view_in_another_process(imagenet_shards):
    ns: dict = {}
    exec(_REPLAY, ns)
    mine = ns["replay"](str(imagenet_shards))
    # the other process: one torch thread, another hash seed
    script = _REPLAY + "\ntorch.set_num_threads(1)\nprint(json.dumps(replay(sys.argv[1]), sort_keys=True))\n"
    env = {**os.environ, "PYTHONHASHSEED": "123", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(__file__)), env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, "-c", script, str(imagenet_shards)], capture_output=True, text=True,
                         env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    there = json.loads(res.stdout)
    assert len(mine) == 3 * 2 * 24 and mine == there
    assert mine["imagenet/0/3"] != mine["imagenet/5/3"]  # and the views really vary with the epoch


def test_views_do_not_depend_on_reading_order():
    r = get_recipe("imagenet", 32)
    x = _image(60, 70)
    forward = [apply_view(x, sample_view(view_rng(0, 1, i), 60, 70, r), r) for i in range(6)]
    backward = [apply_view(x, sample_view(view_rng(0, 1, i), 60, 70, r), r) for i in reversed(range(6))]
    assert all(torch.equal(a, b) for a, b in zip(forward, reversed(backward), strict=True))
    digest = {hashlib.sha256(v.numpy().tobytes()).hexdigest() for v in forward}
    assert len(digest) == 6
    assert math.isclose(get_recipe("imagenet").eval_crop_fraction, 0.875)


@pytest.mark.parametrize("top, left", [(3, 0), (-3, 0), (0, 4), (-4, -4), (2, 1)])
def test_small_recipe_window_on_an_image_smaller_than_its_pad(top, left):
    """A 2x3 image with pad 4: a window shifted past the image is all padding (zeros), never a torch error."""
    from logitcache.views.params import ViewParams
    from logitcache.views.recipe import apply_view, get_recipe

    image = torch.full((3, 2, 3), 200, dtype=torch.uint8)
    out = apply_view(image, ViewParams(top, left, 2, 3, False), get_recipe("small", 2))
    assert out.shape == (3, 2, 2) and out.dtype == torch.uint8
    if abs(top) >= 2 or abs(left) >= 3:
        assert int(out.max()) == 0


@pytest.mark.parametrize("name", ["imagenet@1", "imagenet@2", "deit@2", "tv-v2@2"])
def test_views_cut_from_a_shared_source_are_the_same_bytes(name):
    """Several views of one image (`--views-per-decode`) cut their crops from one PIL conversion of it
    (`view_source`): every view, flipped or not, augmented or not, is byte-identical to the per-crop path."""
    base, _, version = name.partition("@")
    r = get_recipe(base, 32, int(version))
    for seed, (h, w) in enumerate([(37, 53), (64, 40), (33, 33)]):
        x = _image(h, w, seed)
        if seed % 2:  # channels-last memory, as decoded images come
            x = x.permute(1, 2, 0).contiguous().permute(2, 0, 1)
        source = view_source(x, r, 4)
        assert source is not None and source.size == (w, h)
        for i in range(24):
            p = sample_view(view_rng(seed, i % 4, i), h, w, r)
            key = (seed, i % 4, i)
            assert torch.equal(apply_view(x, p, r, key, source=source), apply_view(x, p, r, key)), (name, seed, i)


def test_a_shared_source_only_where_it_saves_time():
    x = _image(40, 50)
    assert view_source(x, get_recipe("imagenet@2", 32), 2) is None  # two views: converting each crop is cheaper
    assert view_source(x, get_recipe("imagenet@2", 32), 3) is not None
    assert view_source(x, get_recipe("imagenet", 32), 8) is None  # v3 resizes the tensor: PIL never enters
    assert view_source(x, get_recipe("small", 28), 8) is None  # pad + crop windows are cut from the tensor
    with pytest.raises(RecipeError, match="uint8"):
        view_source(x.float(), get_recipe("imagenet@2", 32), 4)
