"""A fixed-step certsdf run and its evaluation, immune to CPU contention (issue 13).

    python scripts/studies/fixed_steps_run.py NAME SCENE STEPS [ns-train options...]

with SCENES_DIR / OUT_DIR from the environment (defaults bench_results/scenes, bench_results/fixed):
`ns-train certsdf` for STEPS steps, pinned to core 1, with certsdf-bench's settings (4096 rays per
batch, scale 1, CPU) on the generated scene SCENES_DIR/SCENE_200px (render it first with
`certsdf-bench quality --scene-names SCENE ...`), then the bench's own evaluation of the final
checkpoint: PSNR/SSIM on the first 5 test views, the 256³ zero-set mesh against gt_mesh.ply
(Chamfer-L1, F-scores, signed offset) and the safety-margin report (certsdf_ns.bench.margin).
Time-budgeted runs (certsdf-bench) count steps in seconds, so on a shared machine their results
depend on the load; these compare options at equal steps. Writes OUT_DIR/NAME/result.json.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import trimesh

from certsdf_ns.bench.evaluate import render_metrics, test_views
from certsdf_ns.bench.margin import margin_report
from certsdf_ns.bench.meshes import certsdf_grid_mesh
from certsdf_ns.export.geometry_eval import evaluate_mesh
from certsdf_ns.export.query import CertifiedSDF
from certsdf_ns.export.run import load_run


def main() -> None:
    name, scene_name, steps, extra = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
    scene = Path(os.environ.get("SCENES_DIR", "bench_results/scenes")) / f"{scene_name}_200px"
    out = Path(os.environ.get("OUT_DIR", "bench_results/fixed")) / name
    out.mkdir(parents=True, exist_ok=True)
    cmd = [str(Path(sys.executable).parent / "ns-train"), "certsdf", "--output-dir", str(out), "--experiment-name", "bench", "--timestamp", "run",
           "--vis", "tensorboard", "--max-num-iterations", str(steps), "--steps-per-save", "100000",
           "--steps-per-eval-batch", "1000000000", "--steps-per-eval-image", "1000000000", "--steps-per-eval-all-images", "1000000000",
           "--pipeline.datamanager.train-num-rays-per-batch", "4096", "--pipeline.datamanager.camera-res-scale-factor", "1.0",
           "--machine.device-type", "cpu", "--mixed-precision", "False", *extra, "--data", str(scene)]
    (out / "cmd.txt").write_text(" ".join(cmd) + "\n")
    config = out / "bench" / "certsdf" / "run" / "config.yml"
    train_wall = float("nan")
    if not list((config.parent / "nerfstudio_models").glob("step-*.ckpt")):
        t0 = time.time()
        with open(out / "train.log", "w") as log:
            proc = subprocess.run(["taskset", "-c", "1", *cmd], stdout=log, stderr=subprocess.STDOUT)
        train_wall = time.time() - t0
        assert proc.returncode == 0, f"ns-train failed, see {out/'train.log'}"
    run = load_run(config)
    step, pipeline = run.step, run.pipeline
    cameras, images = test_views(scene, 1.0, 5)
    im = render_metrics(pipeline, cameras, images, step)
    gt = trimesh.load(str(scene / "gt_mesh.ply"), force="mesh")
    mesh = certsdf_grid_mesh(pipeline.model.field, 256)
    mesh.export(out / "mesh.ply")
    m = evaluate_mesh(mesh, gt, n_points=100_000)
    sdf = CertifiedSDF.from_grid(pipeline.model.field.geometry, safety_margin=0.0)
    mr = margin_report(sdf, gt)
    voxel = float(pipeline.model.field.geometry.voxel_size.min())
    res = {"name": name, "scene": scene_name, "steps": steps, "extra": extra, "train_wall_s": train_wall, "psnr": im.psnr, "ssim": im.ssim,
           "chamfer_l1": m.chamfer_l1, "accuracy": m.accuracy, "completeness": m.completeness, "f01": m.fscore[0.01], "f02": m.fscore[0.02],
           "offset_median": m.offset_median, "offset_mean": m.offset_mean, "offset_median_voxels": m.offset_median / voxel,
           "offset_fraction": m.offset_fraction, "components": len(mesh.split(only_watertight=False)), "area": float(mesh.area),
           "margin": mr.to_json(), "command": " ".join(cmd)}
    (out / "result.json").write_text(json.dumps(res, indent=2))
    print(json.dumps({k: v for k, v in res.items() if k not in ("margin", "command")}))
    print("margin near:", mr.fraction_near, "all:", mr.fraction_all, "q:", mr.excess_quantiles_voxels)


if __name__ == "__main__":
    main()
