"""Data-loader throughput (to be moved into bench.py). python bench_data.py"""
import statistics
import time

import data


def bench_loader(root=None, imgsz=512, batch=8, workers=(1, 2), repeats=3, min_images=240,
                 task="angiography_segmentation"):
    """Images/s of the training loader (augmentation on, image + mask) for each worker count: median
    over `repeats` timings of >= min_images each (whole epochs), after one warm-up epoch (worker
    start-up, page cache). Data: a 512 px synthetic set, generated once into data/synthetic512."""
    root = root or data.ensure_synthetic(data.DEFAULT_ROOT.with_name("synthetic512"), n=64, imgsz=512)
    out, epoch = {}, 0
    for w in workers:
        loader = data.build_loader(root, task, "train", imgsz, batch, augment=True, workers=w, seed=0, persistent=True)
        rates = []
        for r in range(repeats + 1):
            t, n = time.perf_counter(), 0
            while n < (min_images if r else 1):
                loader.sampler.set_epoch(epoch)
                epoch += 1
                n += sum(len(b["img"]) for b in loader)
            if r:
                rates.append(n / (time.perf_counter() - t))
        out[w] = statistics.median(rates)
        print(f"loader {task} {imgsz}px batch {batch} augment: {w} worker(s) {out[w]:.1f} img/s "
              f"(median of {repeats} x {n} images)")
    return out


if __name__ == "__main__":
    bench_loader()
