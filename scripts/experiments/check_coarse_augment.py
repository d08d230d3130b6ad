"""Coarse model with the old (resize, then crop) vs the current (crop-window) training augmentation.

    OMP_NUM_THREADS=1 python scripts/experiments/check_coarse_augment.py {old,new} SEED --data data/dubai_half --work /tmp/augchk

Trains DeepLabV3+ (tu-mobilenetv3_small_100, 200 iterations, batch 4, crop 256) on a copy-free view of DATA's train
split, predicts the test split into DATA/coarse/augchk_<mode><seed> and prints test mIoU and WFm(3px).
Figures: docs/results/train_throughput.md, section 6.
"""

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

parser = argparse.ArgumentParser()
parser.add_argument("mode", choices=["old", "new"])
parser.add_argument("seed", type=int)
parser.add_argument("--data", default="data/dubai_half")
parser.add_argument("--work", default="/tmp/augchk")
args = parser.parse_args()

import torch  # noqa: E402

import idgbr.data.augment as A  # noqa: E402

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
if args.mode == "old":
    def old(crop_size=512, seed=None, cat_max_ratio=0.75, ratio_range=(0.5, 2.0), boundary_share=0.0):
        return A.Compose([A.RandomResize(*ratio_range), A.RandomCrop(crop_size, cat_max_ratio=cat_max_ratio),
                          A.RandomHorizontalFlip(0.5), A.ColorJitter()], seed=seed)
    A.paper_train_transform = old

from idgbr.training.coarse import predict_coarse, train_coarse  # noqa: E402
from idgbr.evaluation.evaluate import evaluate_folder  # noqa: E402

name = f"augchk_{args.mode}{args.seed}"
model = os.path.join(args.work, name)
train_coarse(args.data, "deeplabv3plus", model, iters=200, encoder="tu-mobilenetv3_small_100", batch=4, crop=256,
             seed=args.seed, progress=False)
predict_coarse(model, args.data, "test", name=name, progress=False)
result = evaluate_folder(args.data, os.path.join(args.data, "coarse", name), "test", progress=False)
print(args.mode, args.seed, "test mIoU", round(100 * result["miou"], 2), "WFm3", round(100 * result["wfm"]["3"], 2))
