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
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, List, Sequence, Tuple

import torch

from certsdf_ns.bench.offline import prepare_offline_peers


@dataclass
class ImageMetrics:
    step: int
    psnr: float
    ssim: float
    n_views: int
    render_s: float
    """Time to render the N views (not part of any time axis)."""

    def to_json(self) -> dict:
        return asdict(self)


def load_pipeline(config_path: Path, first_step: int):
    """nerfstudio's eval_setup, loading checkpoint `first_step`; returns (config, pipeline)."""
    prepare_offline_peers(announce=False)
    from nerfstudio.utils.eval_utils import eval_setup

    def at_step(config):
        config.load_step = int(first_step)
        return config

    config, pipeline, _, _ = eval_setup(Path(config_path), test_mode="inference", update_config_callback=at_step)
    return config, pipeline


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
    from torchmetrics.functional import peak_signal_noise_ratio, structural_similarity_index_measure

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
    return ImageMetrics(step, sum(psnrs) / n, sum(ssims) / n, n, time.perf_counter() - t0)


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
