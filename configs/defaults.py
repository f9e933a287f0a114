"""Every configuration key, with its default. Other files in configs/ override a few of these; so does
`train.py --config FILE --set key=value`. A key not listed here is an error, so this file is the reference.

A config file defines `config = {...}` and may add per-stage dicts `domainshift1 = {...}`, `camtl = {...}`
that apply on top of it for that stage only.
"""
config = {
    # --- model
    "scale": "n",  # n/s/m/l/x (or [depth, width, max_channels])
    "nc": 1,  # detection classes (stenosis)
    "attn_dim": 64,  # attention width of FPMA/CTAM/CSAM (the original: 256 at every scale)
    "attn_heads": 2,  # 2 heads, 128 tokens: no measurable loss against 4 and 256 (docs/benchmarks.md, the ablation)
    "attn_tokens": 128,  # keys/values pooled to at most this many tokens: cost linear in image area
    "attn_query_stride": 16,  # queries average-pooled to this stride (px), output upsampled back: P3's 2x2.
    # 8 keeps every query, as the original; speed and accuracy of each: docs/benchmarks.md
    "ema_attention": False,  # Efficient Multi-scale Attention after N3/N4/N5
    "gn_groups": 32,  # GroupNorm groups in the seg stream: the first of 32,16,...,1 dividing C, at most this
    "dual_bn": False,  # DualBatchNorm2d: separate BN statistics per domain; on in configs/camtl.py (camtl only)
    # switches of CA-MTL's parts, for ablations; off = the plain YOLOv8 equivalent, without the part's parameters
    "ctam": True,  # cross-task attention det <- seg; off: N_k go straight to CSAM/Detect, and the align term (which
    # compares CTAM's attention with the vessels) is skipped
    "csam": True,  # cross-scale attention; off: D_k go straight to Detect
    "fpma": True,  # the seg stream's top-down attention; off: a plain FPN, S4 = N4 + up(1x1 conv(S5)), S3 alike
    "xtam": False,  # DenseMTL's two-way exchange: seg <- det too, S_k += gate * attn(S_k <- N_k), gates zero at init
    "seg_stride": 8,  # stride of the finest vessel logits: 8 (P3 only, the original), 4 or 2 (a fine path through the
    # backbone's stride-4 and stride-2 maps: much finer vessels, on the demo lower mAP; docs/benchmarks.md, DRIVE)
    "widths": {},  # a pruned network's narrowed layers {layer: channels}, written by compress.py (prune.py); {} = the
    # scale's widths
    "kpt_aux": False,  # centre-keypoint auxiliary on Detect (training only; stripped at export); try it with
    # box=0.01 dfl=0.01, the seed recipe (ablation: docs/benchmarks.md)
    # --- data
    "data": "",  # processed data root; empty = the built-in synthetic data (generated on first use)
    "synthetic_n": 300,  # images per synthetic task when generating
    "synthetic_preset": "default",  # which synthetic set: default, or hard (the study benchmark, docs/study.md)
    "imgsz": 512,  # letterbox size (multiple of 32)
    "batch": 8,
    "workers": 2,
    "group_regex": "",  # when splits.json is written: regex whose first group keys a patient/video
    "camtl_ratio": [1, 2],  # batches per cycle: [det, seg] or [det, seg, source replay]
    "augment": True,  # False: none; a dict changes strengths of data.AUG, e.g. {"scale": 0.25} (sizes x0.75-1.25)
    # --- weights and output
    "init": "",  # a checkpoint this run starts from instead of COCO or stage 1: its weights (a last.pt's EMA) and
    # widths; the run's other model keys must be the checkpoint's. compress.py's fine-tuning sets it
    "stage1": True,  # camtl starts from yolov8{S}-domainshift1.pt when found; False: from COCO weights or random init
    "weights_dir": "weights",  # yolov8{S}.pt / yolov8{S}-seg.pt / yolov8{S}-domainshift1.pt looked up here
    "project": "runs",  # runs/{stage}/{name}
    "name": "",  # empty = exp, exp2, ...
    "exist_ok": False,  # True: reuse runs/{stage}/{name} instead of making {name}2, {name}3, ...
    "device": "auto",  # auto / cpu / cuda / cuda:N, or a GPU index N (= cuda:N). Several GPUs ("0,1") are one
    # process each: torchrun --nproc_per_node=2 train.py ... --set device=cuda, each rank takes cuda:LOCAL_RANK
    "seed": 0,
    "deterministic": True,  # CUDA: deterministic cuDNN/CUDA kernels, as YOLOv8; False: cuDNN autotuning instead
    # --- optimisation (YOLOv8's recipe)
    "epochs": 100,
    "optimizer": "SGD",  # SGD (nesterov) or AdamW
    "lr0": 0.0,  # 0 = the optimizer's default: SGD 0.01, AdamW 0.002
    "lrf": 0.01,  # final lr = lr0 * lrf
    "cos_lr": False,
    "momentum": 0.937,
    "weight_decay": 5e-4,  # scaled by batch * accumulate / nbs
    "nbs": 64,  # nominal batch: gradients accumulate to it
    "warmup_epochs": 3.0,
    "warmup_min_iters": 100,
    "warmup_momentum": 0.8,
    "warmup_bias_lr": 0.1,
    "clip_grad": 10.0,
    "channels_last": True,  # NHWC weights and activations: the same numbers, faster (docs/benchmarks.md)
    "compile": "auto",  # torch.compile the model's forward: true / false / auto = on CUDA only (each graph takes
    # minutes to compile on a CPU); one graph per (tasks, domain, train/val), see train.compile_models
    "amp": True,  # autocast: fp16 (+ GradScaler) on CUDA only; bf16 on CUDA and CPU. fp16 on the CPU trains in fp32
    "amp_dtype": "fp16",  # fp16 / bf16 (`--set amp_dtype=bf16 --device cpu` runs the autocast path on a CPU)
    "qat": False,  # quantisation-aware training: the int8 program's convolutions see int8 weights and inputs
    # (fake quantisation, export.fake_quantize); compress.py --qat sets it
    "ema": True,
    "ema_decay": 0.9999,
    "ema_tau": 2000,
    "max_nan_steps": 10,  # this many non-finite losses in a row stop the run
    # --- losses
    "box": 7.5,
    "cls": 0.5,
    "dfl": 1.5,
    "kpt": 12.0,
    "kobj": 1.0,
    "w_p3": 0.25,
    "w_p4": 0.25,
    "w_p5": 0.25,
    "w_p2": 0.25,  # the fine path's stride-4 logit (seg_stride 4 or 2)
    "w_p1": 0.25,  # its stride-2 logit (seg_stride 2)
    "w_full": 1.0,
    "lambda_det": 1.0,
    "lambda_seg": 1.0,
    "lambda_cons": 0.1,
    "cons_mode": "contain",  # contain: mean ReLU(margin - vessel coverage in each box); bce: boxes as pseudo-mask
    "cons_margin": 0.3,
    "lambda_align": 0.05,
    "lambda_l2sp": 1e-4,
    # --- validation and logging
    "val_interval": 1,  # epochs
    "val_conf": 0.001,
    "val_iou": 0.7,
    "max_det": 300,
    "log_interval": 10,  # iterations between progress lines
    "plots": True,
}
