"""The study benchmark (study.py, docs/study.md): the `hard` synthetic preset -- low-contrast, noisy angiograms with
crossing and foreshortened vessels, a catheter, width step-downs that are no stenoses, stenoses of severity
25-90% -- 1000 images per task (300 to validate on), 256 px, sized for one camtl run of about 5 minutes on a 2-core
CPU (measured: docs/benchmarks.md). The recipe of configs/synthetic.py otherwise (AdamW, a step every batch), from
random init.

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
# 44 cycles of 2 det + 1 seg batches per epoch; the detector needs ~4 epochs to leave the floor, and validating
# 600 images every other epoch keeps the run to ~5 min
camtl = {"epochs": 4, "camtl_ratio": [2, 1], "val_interval": 2}
