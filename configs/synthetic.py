"""The built-in synthetic data (the default when no --config is given): small images and short stages so
both stages finish in minutes on a 2-core CPU."""
config = {
    "data": "",
    "imgsz": 256,
    "batch": 8,
    "nbs": 8,  # step every batch: short runs need every update
    "warmup_epochs": 1.0,
    "warmup_min_iters": 20,
    "log_interval": 10,
}
domainshift1 = {"epochs": 4}
camtl = {"epochs": 10}
