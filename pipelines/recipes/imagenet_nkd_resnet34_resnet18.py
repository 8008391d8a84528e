"""NKD on ImageNet, ResNet-34 -> ResNet-18 (NKD paper, ICCV 2023, Table 1: 71.96 top-1; CE baseline 69.90;
teacher 73.62). γ = 1.5, λ = 1. `dump` once (10 cached views per image by default), then `train`.

    .venv/bin/python pipelines/recipes/imagenet_nkd_resnet34_resnet18.py --data IMAGENET/train --val IMAGENET/val
    .venv/bin/python pipelines/recipes/imagenet_nkd_resnet34_resnet18.py --smoke
"""

import _recipe as r

RECIPE = r.PaperRecipe(
    name="imagenet-nkd-resnet34-resnet18", source="NKD paper, ICCV 2023, Table 1",
    teacher="resnet34", teacher_weights="IMAGENET1K_V1", paper_teacher_top1=73.62,
    students=(r.Student("resnet18", "nkd", 71.96, 69.90, ("gamma=1.5", "temperature=1"), r.RESNET_SCHEDULE),),
    notes=("the paper's teacher is MMClassification's ResNet-34 (73.62); torchvision's IMAGENET1K_V1 is 73.31",
           "100 training epochs replay 10 cached views per image (each view 10 times); --dump-epochs 100 "
           "gives every epoch a fresh view as in the paper"),
)

if __name__ == "__main__":
    r.main(RECIPE)
