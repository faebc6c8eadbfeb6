"""The certified sampler against a dense reference, on a trained checkpoint (issue 15).

    python -m certsdf_ns.bench.sampler_check CONFIG SCENE [--scale 0.25] [--views 5] [--reference 512 64 8]

Renders the scene's first test views three times through the model's own `get_outputs_for_camera`:
with the certified sampler (the default: samples only inside each ray's band), with the uniform sampler
at the configured budget (the same samples spread over the whole box: no skipping), and with a dense
reference, the uniform sampler over the whole box with `REFERENCE` samples per ray (`--reference
COARSE FINE COLOUR`: e.g. 1024 64 1088 colours every sample, the converged rendering). Reports PSNR and SSIM of each
against the ground truth, the PSNR between the two renders, the time per image, and the distribution
of SDF lookups per ray (march steps + samples; mean and p95).

It also measures what the skipping alone changes (:func:`skipped_contribution`): each view is rendered
from the certified sampler's own samples, and again from the same samples plus dense ones in every
stretch the march skipped. The certificate says the skipped stretches hold opacity at most τ
(`band_opacity`) before and after the band, so the two renders differ by at most 2τ per pixel. A dense
reference over the whole box cannot isolate that: the renderer colours only the heaviest samples of each
ray, so changing where the samples lie changes the colour quadrature too.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Dict

import torch

from certsdf_ns.bench.evaluate import test_views
from certsdf_ns.export.run import load_run
from certsdf_ns.method.model import SampleBudget

REFERENCE = SampleBudget(coarse=512, fine=64, colour=8)
"""The dense reference: 512 uniform + 64 PDF samples over the whole box, the same colour budget."""


@torch.no_grad()
def _render(model, cameras, images) -> Dict[str, float]:
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

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


@torch.no_grad()
def skipped_contribution(model, camera, dense: int = 512) -> Dict[str, float]:
    """Largest per-pixel change of `rgb` and `accumulation` when `dense` samples are added to each
    stretch of every ray that the certified march skipped (before and after the band; the whole ray when
    it never reaches the band), keeping the certified samples as they are. Eval mode; one camera."""
    bundle = model.clip(camera.generate_rays(camera_indices=0, keep_shape=False).to(model.device))
    sdf_grid = model.field.geometry.sdf_grid()
    budget = model.sample_budget()
    t_in, t_out, _, _ = model.band_intervals(bundle, sdf_grid)
    near, far = bundle.nears[:, 0], bundle.fars[:, 0]
    reaches = (t_in < t_out) & (far > near)
    steps = torch.linspace(0.0, 1.0, dense + 1, device=near.device)
    changes = {"rgb": 0.0, "accumulation": 0.0}
    hit = torch.nonzero(reaches)[:, 0]
    if hit.numel():
        rays = bundle[hit]
        rays.nears, rays.fars = t_in[hit, None], t_out[hit, None]
        samples = model.place_samples(rays, sdf_grid, budget)
        certified = model.render_samples(samples, sdf_grid, budget)
        band_edges = torch.cat([samples.frustums.starts[..., 0], samples.frustums.ends[:, -1:, 0]], dim=-1)
        lo, hi = near[hit, None], far[hit, None]
        before = lo + (band_edges[:, :1] - lo) * steps[None, :-1]
        after = band_edges[:, -1:] + (hi - band_edges[:, -1:]) * steps[None, 1:]
        edges = torch.cat([before, band_edges, after], dim=-1)[..., None]
        both = model.render_samples(rays.get_ray_samples(edges[:, :-1], edges[:, 1:]), sdf_grid, budget)
        for key in changes:
            changes[key] = float((both[key] - certified[key]).abs().max())
    miss = torch.nonzero(~reaches & (far > near))[:, 0]
    if miss.numel():  # certified: background (nothing rendered); densely sampled: what the skip hid
        rays = bundle[miss]
        edges = (near[miss, None] + (far - near)[miss, None] * steps[None])[..., None]
        both = model.render_samples(rays.get_ray_samples(edges[:, :-1], edges[:, 1:]), sdf_grid, budget)
        for key in changes:
            changes[key] = max(changes[key], float(both[key].abs().max()))
    return {"max_rgb_change": changes["rgb"], "max_accumulation_change": changes["accumulation"],
            "rays": len(bundle), "rays_reaching_band": int(hit.numel()), "band_opacity": model.config.band_opacity}  # fmt: skip


def sampler_equivalence(
    config: Path, scene: Path, scale_factor: float = 1.0, n_views: int = 5, reference_budget: SampleBudget = REFERENCE
) -> Dict[str, float]:
    run = load_run(Path(config))
    step, model = run.step, run.model.eval()
    cameras, images = test_views(Path(scene), scale_factor, n_views)
    cfg = model.config
    saved = cfg.sampler
    try:
        cfg.sampler = "certified"
        certified = _render(model, cameras, images)
        cfg.sampler = "uniform"
        uniform = _render(model, cameras, images)
        model.set_sample_budget_hook(lambda configured: reference_budget)
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
    skipped = [skipped_contribution(model, cameras[i : i + 1]) for i in range(len(images))]
    result["skipped_max_rgb_change"] = max(s["max_rgb_change"] for s in skipped)
    result["skipped_max_accumulation_change"] = max(s["max_accumulation_change"] for s in skipped)
    result["band_opacity"] = cfg.band_opacity
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("scene", type=Path)
    parser.add_argument("--scale", type=float, default=1.0, help="camera-res-scale-factor of the test views")
    parser.add_argument("--views", type=int, default=5)
    parser.add_argument("--reference", type=int, nargs=3, default=[REFERENCE.coarse, REFERENCE.fine, REFERENCE.colour],
                        metavar=("COARSE", "FINE", "COLOUR"), help="samples per ray of the dense reference")  # fmt: skip
    args = parser.parse_args()
    result = sampler_equivalence(args.config, args.scene, args.scale, args.views, SampleBudget(*args.reference))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
