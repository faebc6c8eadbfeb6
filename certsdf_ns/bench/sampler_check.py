"""The certified sampler against a dense reference, on a trained checkpoint (issue 15).

    python -m certsdf_ns.bench.sampler_check CONFIG SCENE [--scale 0.25] [--views 5]

Renders the scene's first test views three times through the model's own `get_outputs_for_camera`:
with the certified sampler (the default: samples only inside each ray's band), with the uniform sampler
at the configured budget (the same samples spread over the whole box: no skipping), and with a dense
reference, the uniform sampler over the whole box with `REFERENCE` samples per ray. Reports PSNR and SSIM of each
against the ground truth, the PSNR between the two renders, the time per image, and the distribution
of SDF lookups per ray (march steps + samples; mean and p95).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Dict

import torch

from certsdf_ns.bench.evaluate import load_pipeline, test_views
from certsdf_ns.export.query import latest_checkpoint
from certsdf_ns.method.model import SampleBudget

REFERENCE = SampleBudget(coarse=512, fine=64, colour=8)
"""The dense reference: 512 uniform + 64 PDF samples over the whole box, the same colour budget."""


@torch.no_grad()
def _render(model, cameras, images) -> Dict[str, float]:
    from torchmetrics.functional import peak_signal_noise_ratio, structural_similarity_index_measure

    psnrs, ssims, lookups, preds = [], [], [], []
    t0 = time.perf_counter()
    for i, gt in enumerate(images):
        out = model.get_outputs_for_camera(cameras[i : i + 1])
        pred = out["rgb"].clamp(0.0, 1.0)
        p, g = pred.permute(2, 0, 1)[None], gt.permute(2, 0, 1)[None]
        psnrs.append(float(peak_signal_noise_ratio(p, g, data_range=1.0)))
        ssims.append(float(structural_similarity_index_measure(p, g, data_range=1.0)))
        lookups.append(out["sdf_lookups"].reshape(-1))
        preds.append(pred)
    n = len(images)
    per_ray = torch.cat(lookups)
    return {
        "psnr": sum(psnrs) / n,
        "ssim": sum(ssims) / n,
        "render_s_per_image": (time.perf_counter() - t0) / n,
        "lookups_mean": float(per_ray.mean()),
        "lookups_p95": float(per_ray.quantile(0.95)),
        "images": preds,
    }


def sampler_equivalence(config: Path, scene: Path, scale_factor: float = 1.0, n_views: int = 5) -> Dict[str, float]:
    step = int(latest_checkpoint(Path(config).parent / "nerfstudio_models").stem.split("-")[1])
    _, pipeline = load_pipeline(Path(config), step)
    model = pipeline.model.eval()
    cameras, images = test_views(Path(scene), scale_factor, n_views)
    cfg = model.config
    saved = cfg.sampler
    try:
        cfg.sampler = "certified"
        certified = _render(model, cameras, images)
        cfg.sampler = "uniform"
        uniform = _render(model, cameras, images)
        model.set_sample_budget_hook(lambda configured: REFERENCE)
        reference = _render(model, cameras, images)
    finally:
        cfg.sampler = saved
        model.set_sample_budget_hook(None)
    between = [
        float(-10.0 * torch.log10(((a - b) ** 2).mean().clamp_min(1e-12)))
        for a, b in zip(certified.pop("images"), reference.pop("images"))
    ]
    result = {"step": step, "n_views": len(images)}
    result.update({f"certified_{k}": v for k, v in certified.items()})
    result.update({f"reference_{k}": v for k, v in reference.items()})
    uniform.pop("images")
    result.update({f"uniform_{k}": v for k, v in uniform.items()})
    result["psnr_between"] = sum(between) / len(between)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("scene", type=Path)
    parser.add_argument("--scale", type=float, default=1.0, help="camera-res-scale-factor of the test views")
    parser.add_argument("--views", type=int, default=5)
    args = parser.parse_args()
    print(json.dumps(sampler_equivalence(args.config, args.scene, args.scale, args.views), indent=1))


if __name__ == "__main__":
    main()
