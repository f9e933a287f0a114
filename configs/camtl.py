"""Stage 2: angiography detection + angiography segmentation (+ optional retinography replay),
initialised from stage 1, DualBN on."""
config = {
    "camtl_ratio": [1, 2],
    "dual_bn": True,  # source/target BatchNorm branches in backbone, neck and Detect, both seeded from stage 1
}
