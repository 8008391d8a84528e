"""NKD on ImageNet, ResNet-50 -> MobileNet (V1) (NKD paper, ICCV 2023, Table 1: 72.58 top-1; CE baseline 69.21;
teacher 76.55). γ = 1.5, λ = 1. `dump` once, then `train`.

    .venv/bin/python pipelines/recipes/imagenet_nkd_resnet50_mobilenet.py --data IMAGENET/train --val IMAGENET/val
    .venv/bin/python pipelines/recipes/imagenet_nkd_resnet50_mobilenet.py --smoke
"""

import _recipe as r

RECIPE = r.PaperRecipe(
    name="imagenet-nkd-resnet50-mobilenet", source="NKD paper, ICCV 2023, Table 1",
    teacher="resnet50", teacher_weights="IMAGENET1K_V1", paper_teacher_top1=76.55,
    students=(r.Student("mobilenetv1", "nkd", 72.58, 69.21, ("gamma=1.5", "temperature=1"), r.RESNET_SCHEDULE),),
    notes=("torchvision's resnet50 IMAGENET1K_V1 is 76.13 top-1 (the paper's teacher: 76.55)",),
)

if __name__ == "__main__":
    r.main(RECIPE)
