"""USKD (teacher-free) on ImageNet with DeiT-Tiny and DeiT's own augmentation (NKD/USKD paper, ICCV 2023, Table 3:
74.97 top-1; CE baseline 74.42). α = 1, β = 0.1, μ = 0.005; the ``deit`` view recipe (RandAugment m9-mstd0.5-inc1,
Mixup 0.8 / CutMix 1.0, random erasing 0.25, bicubic crops) drawn fresh each epoch, label smoothing 0.1 in the
λ-mixed CE targets, AdamW 300 epochs as DeiT.

    .venv/bin/python pipelines/recipes/imagenet_uskd_deit.py --data IMAGENET/train --val IMAGENET/val
    .venv/bin/python pipelines/recipes/imagenet_uskd_deit.py --smoke
"""

import _recipe as r

USKD = ("alpha=1", "beta=0.1", "mu=0.005")
RECIPE = r.PaperRecipe(
    name="imagenet-uskd-deit", source="USKD, ICCV 2023, Table 3",
    students=(r.Student("deit_tiny", "uskd", 74.97, 74.42, USKD, (*r.DEIT_SCHEDULE, "--label-smoothing", "0.1")),),
    view_recipe="deit",
)

if __name__ == "__main__":
    r.main(RECIPE)
