"""The built-in synthetic data (the default when no --config is given): 256 px images and short stages, so both
stages run in minutes on a CPU from random init (no COCO weights needed); times and metrics: docs/benchmarks.md.

The recipe: detection from scratch needs a few hundred optimizer steps on det batches, so camtl weighs det batches
2:1 and every batch steps (nbs = batch); AdamW converges faster than SGD here."""
config = {
    "data": "",
    "synthetic_n": 300,
    "imgsz": 256,
    "batch": 8,
    "nbs": 8,  # step every batch: short runs need every update
    "optimizer": "AdamW",
    "warmup_epochs": 1.0,
    "warmup_min_iters": 30,
    "log_interval": 13,
}
domainshift1 = {"epochs": 10}
camtl = {"epochs": 12, "camtl_ratio": [2, 1]}
