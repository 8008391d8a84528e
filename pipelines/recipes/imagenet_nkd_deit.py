"""NKD on ImageNet, DeiT III-Small -> DeiT-Tiny with DeiT's augmentation (NKD/USKD paper, ICCV 2023, supplement
Table 2: 76.68 top-1; DeiT-Tiny CE baseline 72.2 as in DeiT; teacher 81.4). γ = 1.5, λ = 1; the ``deit`` view
recipe: the teacher's outputs are cached on the MIXED views (RandAugment, Mixup/CutMix, erasing) the student is
trained on. The teacher is a timm model with a local weights file:

    .venv/bin/python pipelines/recipes/imagenet_nkd_deit.py --data IMAGENET/train --val IMAGENET/val \\
        --teacher-weights deit3_small_patch16_224.safetensors
    .venv/bin/python pipelines/recipes/imagenet_nkd_deit.py --smoke
"""

import _recipe as r

RECIPE = r.PaperRecipe(
    name="imagenet-nkd-deit3s-deitt", source="NKD, ICCV 2023, supplement Table 2",
    teacher="timm:deit3_small_patch16_224", paper_teacher_top1=81.4,
    students=(r.Student("deit_tiny", "nkd", 76.68, 72.2, ("gamma=1.5",),
                        (*r.DEIT_SCHEDULE, "--label-smoothing", "0.1")),),
    view_recipe="deit",
)

if __name__ == "__main__":
    r.main(RECIPE)
