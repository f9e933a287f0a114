"""Small sets of fundus photographs (DRIVE: 20 training images, CHASE, STARE, HRF) for stage 1, from random init:
the whole image at 576 px (DRIVE is 565 x 584), the fine vessel path down to stride 2 (seg_stride 2), a step every
batch of 2 and AdamW, 300 epochs, sizes drawn from 0.75x to 1.25x instead of 0.5x to 1.5x. Each choice was made on
DRIVE's 4 val images (stride 2 over 4; 200 epochs over 100; then 300 epochs with the narrower sizes over 200 with the
default ones; then batches of 2 over 4). Measured on DRIVE (train 16 / val 4 of the official training images, scored
on the 20 official test images): docs/benchmarks.md. Point `data` at a root made by
`python convert.py drive DRIVE --root R`:

    python train.py --stage domainshift1 --config configs/fundus.py --set data=R"""
config = {
    "data": "data/fundus",
    "imgsz": 576,
    "seg_stride": 2,
    "batch": 2,
    "nbs": 2,  # a step every batch: 16 images are 8 batches an epoch, 2400 steps in 300 epochs
    "optimizer": "AdamW",
    "epochs": 300,
    "augment": {"scale": 0.25},  # the vessels' width in pixels varies less than with data.AUG's 0.5
}
domainshift1 = {"epochs": 300}
