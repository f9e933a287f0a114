"""Real processed data, the original's settings: 512 px, YOLOv8n. Point `data` at the processed root
(layout: docs/data.md), e.g.
    python train.py --stage camtl --config configs/angiography.py --set data=/data/arcade"""
config = {
    "data": "data/processed",
    "imgsz": 512,
    "scale": "n",
    "batch": 8,
    "epochs": 100,
    "group_regex": r"^([A-Za-z]+\d+)_",  # frames of one patient/video stay in one split
}
domainshift1 = {"epochs": 50}
camtl = {"epochs": 100}
