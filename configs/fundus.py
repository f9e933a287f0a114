"""Small sets of fundus photographs (DRIVE: 20 training images, CHASE, STARE, HRF) for stage 1, from random init:
the whole image at 576 px (DRIVE is 565 x 584), the fine vessel path down to stride 2 (seg_stride 2, chosen over 4
on DRIVE's 4 val images), a step every batch of 4 and AdamW, 200 epochs (chosen over 100 there too). Measured on
DRIVE (train 16 / val 4 of the official training images, scored on the 20 official test images):
docs/benchmarks.md. Point `data` at a root made by `python convert.py drive DRIVE --root R`:

    python train.py --stage domainshift1 --config configs/fundus.py --set data=R"""
config = {
    "data": "data/fundus",
    "imgsz": 576,
    "seg_stride": 2,
    "batch": 4,
    "nbs": 4,  # a step every batch: 16 images are 4 batches an epoch, 800 steps in 200 epochs
    "optimizer": "AdamW",
    "epochs": 200,
}
domainshift1 = {"epochs": 200}
