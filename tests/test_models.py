"""Models: builders, the USKD weak head, and safe weight loading (no network: tests make their own checkpoints)."""

from __future__ import annotations

import os
import urllib.error

import pytest
import torch
import torchvision
from torch import nn

from logitcache.errors import ModelError, UnsafeCheckpointError, WeightsError
from logitcache.models.weak_head import WeakHeadModel
from logitcache.models.weights import load_checkpoint, load_weights
from logitcache.models.zoo import (
    FASHION_MNIST_MEAN,
    IMAGENET_MEAN,
    IMAGENET_STD,
    attach_weak_head,
    available_models,
    build_model,
    model_normalization,
    model_spec,
)


class NotATensor:
    """A custom class: a checkpoint holding one needs pickle, which weights_only=True refuses."""

    def __init__(self):
        self.payload = "would run code on unpickling if it defined __reduce__"


def _same_parameters(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --------------------------------------------------------------------------------------------------- builders


@pytest.mark.parametrize(
    ("name", "size"),
    [("smallcnn", 28), ("smallcnn_wide", 28), ("resnet8x4", 28), ("resnet32x4", 32), ("mobilenetv1", 64),
     ("deit_tiny", 32), ("resnet18", 32), ("mobilenet_v2", 32), ("regnet_y_400mf", 64)],
)
def test_build_model_gives_logits_of_num_classes(name, size):
    model = build_model(name, 7, image_size=size).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    ("name", "num_classes", "params"),
    # reference parameter counts: CRD / mdistiller (resnet8x4, resnet32x4 on CIFAR-100), MobileNet 1.0-224,
    # DeiT-Ti (timm deit_tiny_patch16_224)
    [("resnet8x4", 100, 1_233_540), ("resnet32x4", 100, 7_433_860), ("mobilenetv1", 1000, 4_231_976),
     ("deit_tiny", 1000, 5_717_416)],
)
def test_literature_models_have_the_published_size(name, num_classes, params):
    model = build_model(name, num_classes)
    assert sum(p.numel() for p in model.parameters()) == params


def test_deit_tiny_is_a_torchvision_vit_with_the_deit_tiny_shape():
    model = build_model("deit_tiny", 10, image_size=32)
    assert isinstance(model, torchvision.models.VisionTransformer)
    assert (model.patch_size, model.hidden_dim, model.mlp_dim, len(model.encoder.layers)) == (16, 192, 768, 12)
    assert model.encoder.layers[0].self_attention.num_heads == 3
    with pytest.raises(ModelError, match="multiple of the patch size"):
        build_model("deit_tiny", 10, image_size=30)


def test_unknown_model_is_a_model_error_with_suggestions():
    with pytest.raises(ModelError, match="resnet18"):
        build_model("resnet_18", 10)
    assert {"smallcnn", "resnet8x4", "mobilenetv1", "deit_tiny", "resnet18", "swin_t"} <= set(available_models())


def test_timm_names_need_timm():
    try:
        import timm  # noqa: F401
    except ImportError:
        with pytest.raises(ModelError, match="pip install timm"):
            build_model("timm:deit_tiny_patch16_224", 10)
    else:
        model = build_model("timm:deit_tiny_patch16_224", 10, image_size=32)
        wrapped = attach_weak_head(model, "timm:deit_tiny_patch16_224", 10)
        logits, weak = wrapped(torch.randn(2, 3, 32, 32))
        assert logits.shape == weak.shape == (2, 10)


def test_normalization_table():
    assert model_normalization("resnet18") == (IMAGENET_MEAN, IMAGENET_STD)
    assert model_normalization("deit_tiny")[0] == IMAGENET_MEAN
    assert model_normalization("smallcnn") == model_normalization("resnet8x4")
    assert model_normalization("smallcnn")[0] == FASHION_MNIST_MEAN
    assert model_spec("smallcnn").input_size == 28
    assert model_spec("resnet50").input_size == 224


def test_vit_b_16_builds_without_running():
    model = build_model("vit_b_16", 10)
    assert model.image_size == 224
    assert model_spec("vit_b_16").weak_layout == "cls_token"


# --------------------------------------------------------------------------------------------------- weak head


@pytest.mark.parametrize(
    ("name", "size", "site", "channels"),
    [("resnet18", 32, "layer3", 256), ("mobilenet_v2", 32, "features.17", 320),
     ("deit_tiny", 32, "encoder.layers.encoder_layer_5", 192), ("mobilenetv1", 64, "model.11", 512),
     ("smallcnn", 28, "features.1", 32), ("resnet8x4", 28, "layer2", 128), ("swin_t", 64, "features.5", 384)],
)
def test_weak_head_site_and_width(name, size, site, channels):
    model = build_model(name, 5, image_size=size)
    wrapped = attach_weak_head(model, name, 5, image_size=size)
    assert isinstance(wrapped, WeakHeadModel)
    assert wrapped.site == site
    assert wrapped.weak_head.in_features == channels
    # the head is an ordinary submodule: an optimiser over parameters() trains it, DDP syncs it
    assert any(p is wrapped.weak_head.weight for p in wrapped.parameters())
    logits, weak = wrapped(torch.randn(3, 3, size, size))
    assert logits.shape == weak.shape == (3, 5)


def test_weak_head_reads_resnet_layer3_globally_pooled():
    wrapped = attach_weak_head(build_model("resnet18", 4), "resnet18", 4).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits, weak = wrapped(x)
        m = wrapped.backbone
        feature = m.layer3(m.layer2(m.layer1(m.maxpool(m.relu(m.bn1(m.conv1(x)))))))
        assert torch.allclose(weak, wrapped.weak_head(feature.mean(dim=(2, 3))), atol=1e-6)
        assert torch.allclose(logits, m(x), atol=1e-6)


def test_weak_head_reads_the_class_token_after_block_5_before_the_final_norm():
    wrapped = attach_weak_head(build_model("deit_tiny", 4, image_size=32), "deit_tiny", 4).eval()
    x = torch.randn(2, 3, 32, 32)
    vit = wrapped.backbone
    with torch.no_grad():
        _, weak = wrapped(x)
        tokens = vit._process_input(x)
        tokens = torch.cat([vit.class_token.expand(2, -1, -1), tokens], dim=1) + vit.encoder.pos_embedding
        for block in list(vit.encoder.layers)[:6]:
            tokens = block(tokens)
    assert torch.allclose(weak, wrapped.weak_head(tokens[:, 0]), atol=1e-5)


def test_weak_head_pools_swin_nhwc_over_space():
    wrapped = attach_weak_head(build_model("swin_t", 3), "swin_t", 3, image_size=64).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        _, weak = wrapped(x)
        feature = wrapped.backbone.features[:6](x)  # (N, H, W, C)
    assert feature.shape[-1] == 384
    assert torch.allclose(weak, wrapped.weak_head(feature.mean(dim=(1, 2))), atol=1e-5)


@pytest.mark.parametrize(
    ("name", "size", "below", "above"),
    [("resnet18", 32, "layer1", "layer4"), ("deit_tiny", 32, "encoder.layers.encoder_layer_0",
                                            "encoder.layers.encoder_layer_6"),
     ("mobilenetv1", 64, "model.1", "model.12"), ("smallcnn", 28, "features.0", "features.2")],
)
def test_weak_loss_gradients_reach_the_backbone_below_the_site_only(name, size, below, above):
    wrapped = attach_weak_head(build_model(name, 4, image_size=size), name, 4, image_size=size)
    _, weak = wrapped(torch.randn(2, 3, size, size))
    nn.functional.cross_entropy(weak, torch.tensor([0, 1])).backward()
    below_grads = [p.grad for p in wrapped.backbone.get_submodule(below).parameters()]
    above_grads = [p.grad for p in wrapped.backbone.get_submodule(above).parameters()]
    assert all(g is not None for g in below_grads) and any(g.abs().sum() > 0 for g in below_grads)
    assert all(g is None for g in above_grads)
    assert wrapped.weak_head.weight.grad is not None


def test_weak_head_probe_restores_training_modes():
    model = build_model("resnet18", 4)
    model.train()
    model.layer1.eval()  # e.g. a frozen stage
    attach_weak_head(model, "resnet18", 4)
    assert model.training and model.layer2.training and not model.layer1.training


def test_weak_head_custom_site_and_unknown_family():
    model = build_model("vgg11", 4)
    with pytest.raises(ModelError, match="site="):
        attach_weak_head(model, "vgg11", 4)
    wrapped = attach_weak_head(model, "vgg11", 4, site="features.-6", layout="nchw", image_size=32)
    assert wrapped.weak_head.in_features == 512
    with pytest.raises(ModelError, match="no child"):
        attach_weak_head(build_model("smallcnn", 4), "smallcnn", 4, site="features.7")


def test_weak_head_model_under_single_process_ddp(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        wrapped = attach_weak_head(build_model("smallcnn", 4), "smallcnn", 4)
        ddp = nn.parallel.DistributedDataParallel(wrapped)
        logits, weak = ddp(torch.randn(4, 3, 28, 28))
        (logits.sum() + weak.sum()).backward()
        assert wrapped.weak_head.weight.grad is not None
        assert wrapped.backbone.features[0][0].weight.grad is not None
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------------- weights


def test_checkpoint_round_trip_in_every_accepted_layout(tmp_path):
    source = build_model("smallcnn", 10)
    layouts = {
        "raw.pt": source.state_dict(),
        "training.pt": {"model": source.state_dict(), "epoch": torch.tensor(3), "config": "{}"},
        "state_dict.pth": {"state_dict": source.state_dict()},
        "ddp.pt": {f"module.{k}": v for k, v in source.state_dict().items()},
    }
    for filename, obj in layouts.items():
        torch.save(obj, tmp_path / filename)
        loaded = build_model("smallcnn", 10, weights=str(tmp_path / filename))
        assert _same_parameters(source, loaded), filename
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        assert torch.equal(source.eval()(x), loaded.eval()(x))


class RunsCodeOnLoad:
    """Unpickling this calls os.makedirs(marker): the classic malicious checkpoint."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_checkpoint_that_needs_pickle_is_refused(tmp_path):
    path = tmp_path / "unsafe.pt"
    torch.save({"model": build_model("smallcnn", 10).state_dict(), "extra": NotATensor()}, path)
    with pytest.raises(UnsafeCheckpointError, match="needs pickle"):
        load_checkpoint(path)
    with pytest.raises(UnsafeCheckpointError):
        build_model("smallcnn", 10, weights=str(path))


def test_malicious_checkpoint_runs_no_code(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model": RunsCodeOnLoad(str(marker))}, tmp_path / "evil.pt")
    with pytest.raises(UnsafeCheckpointError, match="makedirs"):
        load_weights(build_model("smallcnn", 10), tmp_path / "evil.pt")
    assert not marker.exists()


def test_missing_unexpected_and_mismatched_keys_are_listed(tmp_path):
    state = build_model("smallcnn", 10).state_dict()
    del state["fc.bias"]
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(WeightsError, match=r"missing keys: fc\.bias.*unexpected keys: extra\.weight"):
        build_model("smallcnn", 10, weights=str(tmp_path / "bad.pt"))
    torch.save(build_model("smallcnn", 10).state_dict(), tmp_path / "ten.pt")
    with pytest.raises(WeightsError, match=r"shape mismatches: fc\.weight \(10, 64\) vs model \(3, 64\)"):
        build_model("smallcnn", 3, weights=str(tmp_path / "ten.pt"))


def test_unreadable_or_absent_files_are_weights_errors(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="junk.pt"):
        load_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(WeightsError, match="no such checkpoint"):
        build_model("smallcnn", 10, weights=str(tmp_path / "absent.pt"))
    torch.save(build_model("smallcnn", 10).state_dict(), tmp_path / "whole.pt")
    data = (tmp_path / "whole.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="truncated.pt: not a readable torch checkpoint"):
        build_model("smallcnn", 10, weights=str(tmp_path / "truncated.pt"))
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(WeightsError, match="not a state_dict"):
        build_model("smallcnn", 10, weights=str(tmp_path / "list.pt"))


def test_weak_head_checkpoints_load_into_plain_models_and_back(tmp_path):
    wrapped = attach_weak_head(build_model("smallcnn", 10), "smallcnn", 10)
    torch.save({"model": wrapped.state_dict()}, tmp_path / "uskd.pt")
    plain = build_model("smallcnn", 10, weights=str(tmp_path / "uskd.pt"))
    assert _same_parameters(plain, wrapped.backbone)
    # a plain checkpoint initialises the backbone of a weak-head model; the head keeps its own init
    torch.save(plain.state_dict(), tmp_path / "plain.pt")
    fresh = attach_weak_head(build_model("smallcnn", 10), "smallcnn", 10)
    head_before = fresh.weak_head.weight.clone()
    load_weights(fresh, tmp_path / "plain.pt")
    assert _same_parameters(fresh.backbone, plain)
    assert torch.equal(fresh.weak_head.weight, head_before)


@pytest.fixture
def hub_dir(tmp_path, monkeypatch):
    """An empty torch hub cache, and a network that always fails."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def no_network(url, dst, *args, **kwargs):
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return tmp_path / "hub"


def test_torchvision_weights_download_failure_is_an_error_never_random(hub_dir):
    with pytest.raises(WeightsError, match="could not download .*ResNet18_Weights.IMAGENET1K_V1"):
        build_model("resnet18", 1000, weights="IMAGENET1K_V1")
    assert not any(hub_dir.rglob("*.pth"))


def test_torchvision_weights_are_read_from_the_hub_cache_safely(hub_dir):
    weights = torchvision.models.MobileNet_V3_Small_Weights.IMAGENET1K_V1
    reference = build_model("mobilenet_v3_small", 1000)
    cached = hub_dir / "checkpoints" / os.path.basename(weights.url)
    cached.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), cached)
    for src in ("IMAGENET1K_V1", "DEFAULT", "MobileNet_V3_Small_Weights.IMAGENET1K_V1"):
        assert _same_parameters(build_model("mobilenet_v3_small", 1000, weights=src), reference), src
    with pytest.raises(WeightsError, match="1000 classes"):
        build_model("mobilenet_v3_small", 10, weights="IMAGENET1K_V1")
    with pytest.raises(WeightsError, match="another architecture"):
        build_model("mobilenet_v3_small", 1000, weights="ResNet18_Weights.IMAGENET1K_V1")
    with pytest.raises(WeightsError, match="known: IMAGENET1K_V1"):
        build_model("mobilenet_v3_small", 1000, weights="IMAGENET1K_V9")
    with pytest.raises(WeightsError, match="not one"):
        build_model("smallcnn", 10, weights="IMAGENET1K_V1")


def test_checkpoints_from_fsspec_urls(tmp_path):
    import fsspec

    source = build_model("smallcnn", 10)
    torch.save(source.state_dict(), tmp_path / "w.pt")
    data = (tmp_path / "w.pt").read_bytes()
    fsspec.filesystem("memory").pipe("/logitcache-test/w.pt", data)
    try:
        for url in (f"file://{tmp_path / 'w.pt'}", "memory://logitcache-test/w.pt"):
            assert _same_parameters(build_model("smallcnn", 10, weights=url), source), url
    finally:
        fsspec.filesystem("memory").rm("/logitcache-test", recursive=True)


@pytest.mark.parametrize(("name", "site", "channels"), [("timm:deit_tiny_patch16_224", "blocks.5", 192),
                                                       ("timm:resnet18", "layer3", 256)])
def test_timm_models_and_their_weak_head(name, site, channels):
    pytest.importorskip("timm")
    from logitcache.models.zoo import attach_weak_head, build_model

    model = attach_weak_head(build_model(name, 10, image_size=32), name, 10, image_size=32)
    assert model.site == site and model.weak_head.in_features == channels
    logits, weak = model(torch.rand(2, 3, 32, 32))
    assert logits.shape == weak.shape == (2, 10)
    weak.sum().backward()  # the weak head trains the backbone below its site
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters())
