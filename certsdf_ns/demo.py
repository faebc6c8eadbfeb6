"""`certsdf-demo`: train certsdf on an offline scene and show what it gives.

1. renders a small procedural scene with a known mesh (Blender format, `gt_mesh.ply` beside it);
2. trains certsdf on it through the real `ns-train` (a subprocess: what the demo shows is what a
   user gets);
3. loads the checkpoint, prints the test PSNR/SSIM, exports the certified SDF's zero set as a mesh
   (the extraction of `certsdf-export`) and prints its Chamfer-L1 and F-score against the truth;
4. writes a side-by-side picture of one test view: ground truth | render | certified-SDF slice |
   exported mesh, shaded;
5. prints the command that opens nerfstudio's viewer on the result.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch
import trimesh
from jaxtyping import Float
from PIL import Image, ImageDraw

from certsdf_ns.console import silence_known_noise
from certsdf_ns.data.scenes import make_scene
from certsdf_ns.output_paths import OutputLocationError, check_writable_dir

# The demo's size: about two minutes on one CPU core, training included (see README).
IMAGE_SIZE = 100
"""Rendered image size (pixels)."""
VIEWS = {"n_train": 80, "n_val": 8, "n_test": 10}
"""Views of each split of the demo scene."""
STEPS = 200
"""Training iterations."""
GRID_RESOLUTION = 128
"""Nodes per side of the certified grid."""
RAYS = 1024
"""Training rays per step."""
PANEL = 256
"""Pixels per side of each panel of the picture."""
MESH_COLOUR = np.array([0.90, 0.78, 0.47])


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="certsdf-demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scene-dir", type=Path, default=Path("demo_data/demo_scene"), help="where the demo scene is written")
    p.add_argument("--output-dir", type=Path, default=Path("outputs"), help="ns-train output folder")
    p.add_argument("--image-size", type=int, default=IMAGE_SIZE, help="rendered image size (pixels)")
    p.add_argument("--steps", type=int, default=STEPS, help="training iterations")
    p.add_argument("--grid-resolution", type=int, default=GRID_RESOLUTION, help="certified grid's nodes per side")
    p.add_argument("--rays", type=int, default=RAYS, help="training rays per step")
    p.add_argument("--picture", type=Path, default=Path("demo_result.png"), help="where the side-by-side picture goes")
    p.add_argument("--viewer", action="store_true", help="open nerfstudio's viewer on 127.0.0.1:7007 while training")
    return p


def say(message: str) -> None:
    print(f"[certsdf-demo] {message}", flush=True)


def train(args: argparse.Namespace) -> Path:
    """Run `ns-train certsdf` on the scene; returns the run's config.yml."""
    ns_train = shutil.which("ns-train") or str(Path(sys.executable).with_name("ns-train"))
    cmd = [
        ns_train, "certsdf",
        "--data", str(args.scene_dir),
        "--output-dir", str(args.output_dir),
        "--experiment-name", "demo",
        "--max-num-iterations", str(args.steps),
        "--steps-per-save", str(args.steps),
        "--pipeline.model.grid-resolution", str(args.grid_resolution),
        "--pipeline.datamanager.train-num-rays-per-batch", str(args.rays),
        # A run of a few hundred steps: the unbiased map places the zero set on the surface from its
        # first steps; the paper map (the default, better after minutes) still leaves it about a voxel
        # inside at 200 steps (docs/options.md, density-map).
        "--pipeline.model.density-map", "unbiased", "--pipeline.model.fill-loss-mult", "0.03",
        "--vis", "viewer+tensorboard" if args.viewer else "tensorboard",
        "--viewer.quit-on-train-completion", "True",
    ]  # fmt: skip
    say(" ".join(cmd))
    started = time.perf_counter()
    rc = subprocess.call(cmd)
    if rc != 0:
        raise SystemExit(f"[certsdf-demo] ns-train failed with exit code {rc}")
    runs = sorted((args.output_dir / "demo" / "certsdf").glob("*/config.yml"), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise SystemExit(f"[certsdf-demo] no run found under {args.output_dir}")
    say(f"trained {args.steps} steps in {time.perf_counter() - started:.0f} s")
    return runs[-1]


def shade_mesh(mesh: trimesh.Trimesh, origins: np.ndarray, directions: np.ndarray) -> Float[np.ndarray, "N 3"]:
    """Ray-cast the mesh (trimesh, Embree when present): headlight Lambert shading, white where missed."""
    colours = np.ones((len(origins), 3))
    locations, ray_index, face_index = mesh.ray.intersects_location(origins, directions, multiple_hits=False)
    if len(ray_index):
        cos = np.abs(np.einsum("ij,ij->i", mesh.face_normals[face_index], directions[ray_index]))
        colours[ray_index] = MESH_COLOUR * (0.25 + 0.75 * cos[:, None])
    return colours


def to_panel(image: Float[np.ndarray, "H W 3"], title: str) -> Image.Image:
    """One PANEL×PANEL tile with a caption strip."""
    tile = Image.fromarray((np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)).resize((PANEL, PANEL), Image.LANCZOS)
    canvas = Image.new("RGB", (PANEL, PANEL + 18), "white")
    canvas.paste(tile, (0, 18))
    ImageDraw.Draw(canvas).text((4, 3), title, fill=(0, 0, 0))
    return canvas


@torch.no_grad()
def evaluate(config: Path, picture: Path, gt_mesh_path: Path) -> Tuple[dict, dict, Path]:
    """Test metrics, the exported mesh's geometry metrics, and the picture."""
    # Imported here: loading nerfstudio takes seconds, and argument errors should not wait for it.
    from certsdf_ns.export.run import load_run
    from certsdf_ns.export.geometry_eval import evaluate_mesh
    from certsdf_ns.export.mesh import extract_mesh
    from certsdf_ns.viewer.sdf_views import sdf_slice, sdf_slice_image

    pipeline = load_run(config, test_mode="test").pipeline
    image_metrics = pipeline.get_average_eval_image_metrics()  # leaves the pipeline in training mode
    model = pipeline.model.eval()

    geometry = model.field.geometry
    mesh = extract_mesh(geometry, resolution=256)  # Blender scenes: the model's frame is the scene's
    mesh_path = config.parent / "certsdf_mesh.ply"
    mesh.export(mesh_path)
    gt = trimesh.load(str(gt_mesh_path), force="mesh")
    geometry_metrics = evaluate_mesh(mesh, gt, n_points=50_000).to_json()

    dataset = pipeline.datamanager.eval_dataset
    camera = dataset.cameras[0:1].to(model.device)
    outputs = model.get_outputs_for_camera(camera)
    gt_image = dataset.get_image_float32(0)
    if gt_image.shape[-1] == 4:  # composite on the evaluation background (white)
        gt_image = gt_image[..., :3] * gt_image[..., 3:] + (1.0 - gt_image[..., 3:])
    rays = camera.generate_rays(camera_indices=0)
    origins = rays.origins.reshape(-1, 3).cpu().numpy()
    directions = rays.directions.reshape(-1, 3).cpu().numpy()
    shaded = shade_mesh(mesh, origins, directions).reshape(*gt_image.shape[:2], 3)
    # A horizontal cut (NeRF-synthetic scenes are z-up) through the middle of the mesh.
    lo, hi = geometry.aabb[0, 2].item(), geometry.aabb[1, 2].item()
    offset = (float(mesh.bounds[:, 2].mean()) - (lo + hi) / 2) / ((hi - lo) / 2)
    values, _ = sdf_slice(geometry, axis=2, offset=offset, max_pixels=PANEL)
    # Rows of the slice run along +y: flip so +y points up in the picture.
    slice_rgb = sdf_slice_image(values, geometry.max_distance, iso_step=geometry.sigma)[::-1] / 255.0

    panels = [
        to_panel(gt_image.cpu().numpy(), "ground truth (test view)"),
        to_panel(outputs["rgb"].cpu().numpy(), f"certsdf render, {image_metrics['psnr']:.1f} dB"),
        to_panel(slice_rgb, "certified SDF, z-slice (0 = black)"),
        to_panel(shaded, f"mesh, Chamfer-L1 {geometry_metrics['chamfer_l1']:.4f}"),
    ]
    sheet = Image.new("RGB", (PANEL * len(panels), PANEL + 18), "white")
    for i, panel in enumerate(panels):
        sheet.paste(panel, (i * PANEL, 0))
    picture.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(picture)
    return image_metrics, geometry_metrics, mesh_path


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    started = time.perf_counter()
    silence_known_noise()  # before the evaluation imports nerfstudio
    try:  # before rendering and training (ns-train checks its run folder again)
        check_writable_dir(args.output_dir, "--output-dir")
        check_writable_dir(args.picture.parent, "--picture's folder")
        if not (args.scene_dir / "transforms_train.json").exists():
            check_writable_dir(args.scene_dir, "--scene-dir")
    except OutputLocationError as exc:
        print(f"certsdf-demo: error: {exc}", file=sys.stderr)
        return 2
    if not (args.scene_dir / "transforms_train.json").exists():
        say(f"rendering the demo scene into {args.scene_dir} ...")
        make_scene(args.scene_dir, image_size=args.image_size, **VIEWS)
    else:
        say(f"reusing the demo scene in {args.scene_dir}")
    config = train(args)
    image_metrics, geometry_metrics, mesh_path = evaluate(config, args.picture, args.scene_dir / "gt_mesh.ply")
    fscore = geometry_metrics["fscore"]
    print()
    say(f"test PSNR {image_metrics['psnr']:.2f} dB, SSIM {image_metrics['ssim']:.3f} ({VIEWS['n_test']} test views)")
    say(
        f"mesh {mesh_path}: Chamfer-L1 {geometry_metrics['chamfer_l1']:.4f}, "
        f"F@0.01 {fscore['0.01']:.3f}, F@0.02 {fscore['0.02']:.3f} against {args.scene_dir / 'gt_mesh.ply'} "
        "(the object spans 1.8 scene units)"
    )
    say(f"picture: {args.picture} (ground truth | render | certified-SDF slice | mesh)")
    say(f"open the viewer:  ns-viewer --load-config {config} --viewer.websocket-host 127.0.0.1")
    say(f"done in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
