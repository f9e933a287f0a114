"""Stage 1: vessel segmentation on retinography (source domain) only; Detect/CTAM/CSAM frozen."""
config = {
    "lambda_det": 0.0,
    "lambda_cons": 0.0,
    "lambda_align": 0.0,
    "lambda_l2sp": 0.0,  # stage 1 moves away from COCO on purpose
}
