"""The models defined here: the demo's small CNNs, the CIFAR ResNets of the KD literature, MobileNetV1 (the
paper's ResNet-50 -> MobileNet pair) and DeiT-Tiny as a torchvision `VisionTransformer` (see `zoo` for the table)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from logitcache.errors import ModelError


def _conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class SmallCNN(nn.Module):
    """Three stages of ``convs_per_stage`` 3x3 conv-BN-ReLU, 2x2 max-pool after the first two, GAP, linear.

    At 28 px the stages see 28, 14 and 7 px. Kept deliberately plain so that it trains at thousands of
    images per second on two CPU cores.
    """

    def __init__(self, num_classes: int, widths: tuple[int, int, int] = (16, 32, 64), convs_per_stage: int = 1):
        super().__init__()
        stages = []
        c_in = 3
        for i, width in enumerate(widths):
            layers: list[nn.Module] = []
            for j in range(convs_per_stage):
                layers += _conv_bn_relu(c_in if j == 0 else width, width)
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            stages.append(nn.Sequential(*layers))
            c_in = width
        self.features = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class CifarBasicBlock(nn.Module):
    """The CIFAR ResNet basic block of CRD / mdistiller (same parameter names, so their checkpoints load)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class CifarResNet(nn.Module):
    """CIFAR ResNet (He et al. 2016, Sec. 4.2) as in CRD / mdistiller: depth = 6n + 2, three stages.

    ``resnet8x4`` = depth 8, widths (32, 64, 128, 256); ``resnet32x4`` = depth 32, same widths. The final
    pooling is adaptive (mdistiller uses ``AvgPool2d(8)``: identical at 32 px, and 28 px inputs work too).
    """

    def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._stage(widths[0], widths[1], n, stride=1)
        self.layer2 = self._stage(widths[1], widths[2], n, stride=2)
        self.layer3 = self._stage(widths[2], widths[3], n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    @staticmethod
    def _stage(c_in: int, c_out: int, blocks: int, stride: int) -> nn.Sequential:
        return nn.Sequential(
            CifarBasicBlock(c_in, c_out, stride), *(CifarBasicBlock(c_out, c_out) for _ in range(blocks - 1))
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class MobileNetV1(nn.Module):
    """MobileNet (Howard et al. 2017), width 1.0, as used for the ResNet-50 -> MobileNet pair in CRD / DKD.

    Same layout and parameter names as mdistiller's ImageNet ``MobileNetV1`` (``model`` = 14 conv blocks + pool,
    ``fc``), so its checkpoints load. ``model[7:12]`` are the five 512-channel stride-16 blocks; ``model[12:14]``
    the two 1024-channel stride-32 blocks.
    """

    def __init__(self, num_classes: int = 1000):
        super().__init__()

        def conv_bn(c_in: int, c_out: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(True))

        def conv_dw(c_in: int, c_out: int, stride: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in, bias=False),
                nn.BatchNorm2d(c_in),
                nn.ReLU(True),
                nn.Conv2d(c_in, c_out, 1, 1, 0, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(True),
            )

        # (out channels, stride) of the depthwise-separable blocks after the stem
        plan = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + [(512, 1)] * 5 + [(1024, 2), (1024, 1)]
        blocks: list[nn.Module] = [conv_bn(3, 32, 2)]
        c_in = 32
        for c_out, stride in plan:
            blocks.append(conv_dw(c_in, c_out, stride))
            c_in = c_out
        blocks.append(nn.AdaptiveAvgPool2d(1))
        self.model = nn.Sequential(*blocks)
        self.fc = nn.Linear(1024, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.model(x), 1))


def _deit_tiny(num_classes: int, image_size: int | None) -> nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    size = 224 if image_size is None else image_size
    _check_patch_divisible("deit_tiny", size, 16)
    return VisionTransformer(
        image_size=size, patch_size=16, num_layers=12, num_heads=3, hidden_dim=192, mlp_dim=768, num_classes=num_classes
    )


def _check_patch_divisible(name: str, size: int, patch: int) -> None:
    if size % patch != 0:
        raise ModelError(f"{name}: image size {size} is not a multiple of the patch size {patch}")


