"""The study benchmark (study.py, docs/study.md): the `hard` synthetic preset -- low-contrast, noisy angiograms with
crossing and foreshortened vessels, a catheter, width step-downs that are no stenoses, stenoses of severity
25-90% -- 1000 images per task (300 to validate on), 256 px, camtl trained until the full model has converged
(about 30 min of one CPU core a run; measured: docs/benchmarks.md). The recipe of configs/synthetic.py otherwise
(AdamW, a step every batch), from random init.

    python train.py --stage domainshift1 --config configs/hard.py
    python train.py --stage camtl --config configs/hard.py"""
config = {
    "data": "",
    "synthetic_preset": "hard",
    "synthetic_n": 1000,
    "imgsz": 256,
    "batch": 8,
    "nbs": 8,  # step every batch: short runs need every update
    "optimizer": "AdamW",
    "warmup_epochs": 0.5,
    "warmup_min_iters": 30,
    "log_interval": 20,
}
domainshift1 = {"epochs": 3}  # 88 batches per epoch
# 44 cycles of 2 det + 1 seg batches per epoch; 12 epochs: the full model's last validations agree within the
# epoch-to-epoch noise (8 epochs leave it short), validating 600 images every other epoch
camtl = {"epochs": 12, "camtl_ratio": [2, 1], "val_interval": 2}
