"""One evaluator for every method: render the first N test views of a checkpoint, PSNR and SSIM.

Each method's own `get_image_metrics_and_images` differs (nerfacto and certsdf composite
backgrounds differently; nerfstudio's SSIM infers the data range from the images), so the
benchmark does not use them. Here, for every method:

- the pipeline is rebuilt from the run's `config.yml` with nerfstudio's `eval_setup`
  (`test_mode="inference"`: the method's datamanager loads no images), after
  `prepare_offline_peers` (LPIPS stub, numpy scalars allowed in checkpoints);
- checkpoints are loaded in step order with `pipeline.load_pipeline` (which also replays
  step-dependent state such as tensorf's grid upsampling or certsdf's σ schedule);
- the test views come from the *scene's* Blender test split read by nerfstudio's Blender
  parser (composited on white, as NeRF-synthetic is evaluated) and rescaled like the
  training images, so every method sees the same cameras and ground truth whatever its own
  dataparser is;
- PSNR and SSIM (torchmetrics, data range 1) are averaged over the N views.

Real captures (`certsdf-bench real`) have no Blender test split: :func:`heldout_views` takes the
held-out dataparser outputs of the scene (the same cameras and images for every method, which the
suite checks), and :func:`heldout_metrics` adds PSNR inside the object mask and per-view numbers.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import torch

from certsdf_ns.bench.offline import prepare_offline_peers
from certsdf_ns.export.run import load_run


@dataclass
class ImageMetrics:
    step: int
    psnr: float
    ssim: float
    n_views: int
    render_s: float
    """Time to render the N views (not part of any time axis)."""
    psnr_per_view: List[float] = field(default_factory=list)
    """Each view's PSNR, in test-split order (so a subset of views can be compared across runs)."""
    ssim_per_view: List[float] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def load_pipeline(config_path: Path, first_step: int):
    """The run (certsdf's or a peer's) with checkpoint `first_step` loaded; returns (config, pipeline)."""
    prepare_offline_peers(announce=False)
    run = load_run(Path(config_path), int(first_step), method=None)
    return run.config, run.pipeline


def test_views(scene: Path, scale_factor: float, n_views: int) -> Tuple[object, List[torch.Tensor]]:
    """(cameras, images) of the first `n_views` test views, images [H, W, 3] on white in [0, 1]."""
    from nerfstudio.data.dataparsers.blender_dataparser import BlenderDataParserConfig
    from nerfstudio.data.datasets.base_dataset import InputDataset

    outputs = BlenderDataParserConfig(data=Path(scene), alpha_color="white").setup().get_dataparser_outputs("test")
    dataset = InputDataset(outputs, scale_factor=scale_factor)
    n = min(n_views, len(dataset))
    images = [dataset.get_image_float32(i)[..., :3] for i in range(n)]
    return dataset.cameras[:n], images


@torch.no_grad()
def render_metrics(pipeline, cameras, images: Sequence[torch.Tensor], step: int) -> ImageMetrics:
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    model = pipeline.model
    model.eval()
    device = pipeline.device
    psnrs, ssims = [], []
    t0 = time.perf_counter()
    for i, gt in enumerate(images):
        camera = cameras[i : i + 1].to(device)
        pred = model.get_outputs_for_camera(camera)["rgb"].clamp(0.0, 1.0).cpu()
        p, g = pred.permute(2, 0, 1)[None], gt.permute(2, 0, 1)[None]
        psnrs.append(float(peak_signal_noise_ratio(p, g, data_range=1.0)))
        ssims.append(float(structural_similarity_index_measure(p, g, data_range=1.0)))
    n = len(images)
    return ImageMetrics(step, sum(psnrs) / n, sum(ssims) / n, n, time.perf_counter() - t0, psnrs, ssims)


@dataclass
class HeldOutViews:
    """Held-out views of a real capture at the evaluation resolution: what every method is scored on."""

    labels: List[str]
    """One name per view (DTU: the view number; otherwise the image's file stem)."""
    files: List[Path]
    """The ground-truth image files (resolved)."""
    cameras: object
    """nerfstudio Cameras, rescaled like the images."""
    images: List[torch.Tensor]
    """[H, W, 3] RGB in [0, 1] (alpha, if any, dropped)."""
    masks: Optional[List[torch.Tensor]] = None
    """[H, W] bool object masks (grey level > 0.5), or None."""


def heldout_views(outputs, scale_factor: float, labels: Sequence[str], mask_files: Optional[Sequence[Path]] = None) -> HeldOutViews:
    """Cameras and images of a dataparser's held-out outputs, rescaled as the datamanagers do
    (nerfstudio's InputDataset); masks read and resized like certsdf's object masks."""
    from nerfstudio.data.datasets.base_dataset import InputDataset

    from certsdf_ns.data.datamanager import load_object_mask

    dataset = InputDataset(outputs, scale_factor=scale_factor)
    images = [dataset.get_image_float32(i)[..., :3] for i in range(len(dataset))]
    masks = None
    if mask_files is not None:
        masks = [load_object_mask(p, scale_factor)[..., 0] > 0.5 for p in mask_files]
        for m, im, p in zip(masks, images, mask_files):
            if m.shape != im.shape[:2]:
                raise ValueError(f"mask {p} is {tuple(m.shape)} at the evaluation scale but its image is {tuple(im.shape[:2])}")
    files = [Path(f).resolve() for f in outputs.image_filenames]
    return HeldOutViews(list(labels), files, dataset.cameras, images, masks)


def psnr(pred: torch.Tensor, gt: torch.Tensor, mask: Optional[torch.Tensor] = None) -> float:
    """PSNR (data range 1) of [H, W, 3] images, over the pixels where the [H, W] mask is set (all without one)."""
    err = (pred - gt) ** 2
    if mask is not None:
        if not bool(mask.any()):
            return float("nan")
        err = err[mask]
    return float(-10.0 * torch.log10(err.mean().clamp_min(1e-12)))


@dataclass
class ViewMetrics:
    view: str
    psnr: float
    psnr_masked: float
    """PSNR inside the object mask (NaN without masks)."""
    ssim: float
    render_s: float


@dataclass
class HeldOutMetrics:
    """Mean metrics over the held-out views, and each view's."""

    step: int
    psnr: float
    psnr_masked: float
    ssim: float
    n_views: int
    render_s: float
    """Time to render all views."""
    render_s_per_view: float
    views: List[ViewMetrics]

    def to_json(self) -> dict:
        return asdict(self)


@torch.no_grad()
def heldout_metrics(pipeline, views: HeldOutViews, step: int) -> HeldOutMetrics:
    """Render every view through the method's own `model.get_outputs_for_camera` and compare its
    `rgb` with the ground truth: PSNR over the whole image, PSNR inside the mask, SSIM (torchmetrics,
    data range 1). The same function for every method."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    model = pipeline.model
    model.eval()
    per_view = []
    for i, (label, gt) in enumerate(zip(views.labels, views.images)):
        camera = views.cameras[i : i + 1].to(pipeline.device)
        t0 = time.perf_counter()
        pred = model.get_outputs_for_camera(camera)["rgb"].clamp(0.0, 1.0).cpu()
        seconds = time.perf_counter() - t0
        if pred.shape != gt.shape:
            raise ValueError(f"view {label}: the render is {tuple(pred.shape)} but the ground truth {tuple(gt.shape)}")
        mask = views.masks[i] if views.masks is not None else None
        ssim = float(structural_similarity_index_measure(pred.permute(2, 0, 1)[None], gt.permute(2, 0, 1)[None], data_range=1.0))
        per_view.append(ViewMetrics(label, psnr(pred, gt), psnr(pred, gt, mask) if mask is not None else float("nan"), ssim, seconds))
    n = len(per_view)
    total = sum(v.render_s for v in per_view)

    def mean(key: str) -> float:
        return sum(getattr(v, key) for v in per_view) / n

    return HeldOutMetrics(step, mean("psnr"), mean("psnr_masked"), mean("ssim"), n, total, total / n, per_view)


def iter_checkpoints(config_path: Path, checkpoints: Sequence[Tuple[int, Path]]) -> Iterator[Tuple[int, object]]:
    """Yield (step, pipeline) with each checkpoint loaded in turn, in step order.

    The pipeline is built once (cheap checkpoints, expensive set-up); a checkpoint that cannot be
    loaded (e.g. cut short by a kill) raises, and the caller records it.
    """
    ordered = sorted(checkpoints, key=lambda c: c[0])
    if not ordered:
        return
    _, pipeline = load_pipeline(Path(config_path), ordered[0][0])
    yield ordered[0][0], pipeline
    for step, path in ordered[1:]:
        # As nerfstudio's eval_load_checkpoint does it (weights_only default of this torch).
        state = torch.load(path, map_location="cpu")
        pipeline.load_pipeline(state["pipeline"], state["step"])
        yield step, pipeline
