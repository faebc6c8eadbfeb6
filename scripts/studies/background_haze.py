"""How much of a certsdf run's image error is haze over the background (RGBA test images only).

    .venv/bin/python scripts/studies/background_haze.py outputs/.../config.yml [--views 0 3]

For each test view: PSNR, the mean rendered accumulation where the image's alpha is < 0.5,
the fraction of those pixels above 0.02, and the squared error split between object and
background. A clean background has accumulation ~0 there; random-background training alone
leaves a faint haze (see README, "Where lego's PSNR goes").
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from nerfstudio.utils.eval_utils import eval_setup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--views", type=int, nargs="+", default=[0, 3])
    args = parser.parse_args()
    _, pipeline, _, step = eval_setup(args.config, test_mode="test")
    model, dataset = pipeline.model, pipeline.datamanager.eval_dataset
    print(f"checkpoint step {step}")
    for index in args.views:
        image = dataset[index]["image"].to(torch.float32)
        if image.shape[-1] != 4:
            raise SystemExit(f"{args.config}: test images have no alpha channel; nothing to measure")
        with torch.no_grad():
            outputs = model.get_outputs_for_camera(dataset.cameras[index : index + 1])
        gt = model._gt_on_eval_background(image)
        squared = ((outputs["rgb"] - gt) ** 2).mean(-1)
        background = image[..., 3] < 0.5
        haze = outputs["accumulation"][..., 0][background]
        psnr = -10 * torch.log10(squared.mean())
        share = float(squared[background].sum() / squared.sum())
        print(
            f"view {index}: PSNR {psnr:.2f} dB, background accumulation mean {haze.mean():.3f}, "
            f"{(haze > 0.02).float().mean():.0%} of background pixels > 0.02, "
            f"background holds {share:.0%} of the squared error ({background.float().mean():.0%} of the pixels)"
        )


if __name__ == "__main__":
    main()
