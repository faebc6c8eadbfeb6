"""End to end through the real CLIs: ns-train certsdf on a generated scene, then ns-eval."""

from __future__ import annotations

import json
import re
import shutil
from concurrent.futures import Future
from pathlib import Path
from typing import Dict, Tuple

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import TrainedRun, ns, run_cli, start_cli_runs


@pytest.fixture(scope="module")
def cli_runs(tiny_scene: Path, tmp_path_factory) -> Dict[str, Tuple[Future, Path]]:
    """The CLI runs of this file that need no trained run, two at a time: name -> (future of the
    finished process, the folder of their data and outputs)."""
    root = tmp_path_factory.mktemp("e2e_cli")
    no_val = Path(shutil.copytree(tiny_scene, root / "no_val"))
    (no_val / "transforms_val.json").unlink()
    ns_scene = _to_nerfstudio_format(tiny_scene, root / "ns_scene")
    runs = {  # name: (arguments, environment entries)
        "help": ([ns("ns-train"), "--help"], {}),
        # With Python's warnings on (the suite otherwise runs with PYTHONWARNINGS=ignore), and an eval
        # image rendered through nerfstudio's Cameras.
        "nerfstudio-format": ([ns("ns-train"), "certsdf", "--data", ns_scene, "--output-dir", root / "ns_out", *QUICK,
                               "--steps-per-eval-image", "10"], {"PYTHONWARNINGS": "default"}),
        "no-val": ([ns("ns-train"), "certsdf", "--data", no_val, "--output-dir", root / "no_val_out", *QUICK], {}),
    }  # fmt: skip
    futures = start_cli_runs({name: (args, {"timeout": 600, "env_extra": env}) for name, (args, env) in runs.items()})
    return {name: (future, root) for name, future in futures.items()}


def test_certsdf_is_listed_in_ns_train_help(cli_runs) -> None:
    proc = cli_runs["help"][0].result()
    assert proc.returncode == 0
    assert "certsdf" in proc.stdout


def _train_psnr(run: TrainedRun) -> list:
    events = EventAccumulator(str(run.config.parent))
    events.Reload()
    tag = next(t for t in events.Tags()["scalars"] if t.endswith("psnr") and "Train" in t)
    return [e.value for e in events.Scalars(tag)]


def test_training_psnr_rises(trained_run: TrainedRun) -> None:
    """Mean training PSNR over the last 5 logs beats the first 5 by at least 6 dB."""
    psnr = _train_psnr(trained_run)
    assert len(psnr) >= 20
    first, last = sum(psnr[:5]) / 5, sum(psnr[-5:]) / 5
    assert last > first + 6.0, (first, last)


def test_learned_geometry_is_a_surface_not_fog(trained_run: TrainedRun) -> None:
    """Against the ground-truth mesh of the generated scene:
    - SDF sign right at >= 95% of random points more than 2 voxels from the true surface,
      and at >= 90% of such points inside the object (the interior is what fog models miss);
    - fewer than 5% of points more than 0.1 from the surface are visible, i.e. stop more than
      1% of the light within one voxel (alpha = 1 − exp(−density·voxel) > 0.01).
    """
    from nerfstudio.utils.eval_utils import eval_setup

    from certsdf_ns.export.diagnostics import surface_report

    _, pipeline, _, _ = eval_setup(trained_run.config, test_mode="inference")
    report = surface_report(pipeline.model.field, trained_run.scene / "gt_mesh.ply", alpha_threshold=0.01)
    assert report.sign_agreement >= 0.95, report
    assert report.inside_agreement >= 0.90, report
    assert report.visible_fog_fraction < 0.05, report


def test_checkpoints_load_with_torch_load_defaults(trained_run: TrainedRun) -> None:
    """torch>=2.6 loads with weights_only=True: no numpy scalars may hide in the checkpoint."""
    ckpts = sorted(trained_run.checkpoint_dir.glob("*.ckpt"))
    assert ckpts
    state = torch.load(ckpts[-1], map_location="cpu", weights_only=True)
    assert state["step"] == trained_run.steps - 1
    assert "_model.field.geometry.logits" in state["pipeline"]


def test_ns_eval_loads_the_checkpoint_and_reports_sane_psnr(trained_run: TrainedRun, tmp_path: Path) -> None:
    out = tmp_path / "eval.json"
    proc = run_cli([ns("ns-eval"), "--load-config", trained_run.config, "--output-path", out], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert 18.0 < results["psnr"] < 60.0, results
    assert 0.5 < results["ssim"] <= 1.0


def test_a_run_ends_with_its_result(trained_run: TrainedRun) -> None:
    """The run's last line gives the final evaluation's PSNR and SSIM (the values logged at the last step),
    on how many of the held-out views, the last checkpoint, and the command that exports the mesh."""
    run, step = trained_run.config.parent, trained_run.steps - 1
    held_out = len(json.loads((trained_run.scene / "transforms_val.json").read_text())["frames"])
    last = [line for line in trained_run.stdout.splitlines() if line.strip()][-1]
    result = re.fullmatch(
        rf"\[certsdf\] result at step {step}: PSNR ([0-9.]+) dB, SSIM ([0-9.]+) on 1 of {held_out} held-out views; "
        r"checkpoint (\S+); export the mesh: (.+)",
        last,
    )
    assert result, last
    events = EventAccumulator(str(run))
    events.Reload()
    for value, metric in ((result[1], "psnr"), (result[2], "ssim")):
        (logged,) = [e for e in events.Scalars(f"Eval Images Metrics/{metric}") if e.step == step]
        assert float(value) == pytest.approx(logged.value, abs=0.006), metric
    assert float(result[1]) > 15.0 and 0.3 < float(result[2]) <= 1.0  # a trained run, not noise
    assert Path(result[3]) == trained_run.checkpoint_dir / f"step-{step:09d}.ckpt" and Path(result[3]).is_file()
    assert result[4] == f"certsdf-export --load-config {trained_run.config} --output-dir {run / 'export'}"


QUICK = [
    "--vis", "tensorboard", "--viewer.quit-on-train-completion", "True", "--max-num-iterations", "20",
    "--steps-per-eval-batch", "10", "--pipeline.datamanager.train-num-rays-per-batch", "512",
    "--pipeline.model.grid-resolution", "32", "--pipeline.model.hash-log2-size", "12",
]  # fmt: skip


def _to_nerfstudio_format(blender: Path, out: Path) -> Path:
    """Rewrite a Blender scene as a nerfstudio transforms.json (explicit intrinsics, file names with extension)."""
    import math
    import shutil

    from PIL import Image

    out.mkdir(parents=True)
    frames = []
    for split in ("train", "val"):
        meta = json.loads((blender / f"transforms_{split}.json").read_text())
        for frame in meta["frames"]:
            src = blender / (frame["file_path"].replace("./", "") + ".png")
            dst = out / "images" / f"{split}_{src.name}"
            dst.parent.mkdir(exist_ok=True)
            shutil.copy(src, dst)
            frames.append({"file_path": f"images/{dst.name}", "transform_matrix": frame["transform_matrix"]})
    w, h = Image.open(dst).size
    focal = 0.5 * w / math.tan(0.5 * meta["camera_angle_x"])
    transforms = {"fl_x": focal, "fl_y": focal, "cx": w / 2, "cy": h / 2, "w": w, "h": h, "camera_model": "OPENCV", "frames": frames}
    (out / "transforms.json").write_text(json.dumps(transforms))
    return out


def test_nerfstudio_format_is_detected_and_trains(cli_runs) -> None:
    future, root = cli_runs["nerfstudio-format"]
    proc = future.result()
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "nerfstudio format" in proc.stdout
    # the plugin's messages keep their "[certsdf]" prefix (rich would read it as a style tag)
    assert "[certsdf] colour field backend: " in proc.stdout
    assert list((root / "ns_out").rglob("*.ckpt"))


def test_missing_val_split_falls_back_to_test_with_one_warning(cli_runs) -> None:
    proc = cli_runs["no-val"][0].result()
    out = " ".join((proc.stdout + proc.stderr).split())  # rich wraps long lines
    assert proc.returncode == 0, out[-3000:]
    assert "FileNotFoundError" not in out
    assert out.count("evaluating on the test split") == 1, out[-3000:]


def test_console_hides_known_noise_but_not_other_warnings(cli_runs) -> None:
    """With Python's warnings on, ns-train prints neither tyro's complaint about certsdf's dataparser
    config nor torch's indexing deprecation from nerfstudio's cameras (rendered at the end of
    training), nor what certsdf's own code used to cause (the GradScaler nerfstudio's trainer builds,
    the unused DataLoader workers, float() of losses that require grad, torchmetrics' deprecated
    import), and still prints the warnings that are not silenced."""
    proc = cli_runs["nerfstudio-format"][0].result()
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "does not match any type in Union" not in out
    assert "non-tuple sequence for multidimensional indexing" not in out
    for cause in ("GradScaler", "This DataLoader will create", "requires_grad=True to a scalar", "from `torchmetrics.functional`"):
        assert cause not in out, (cause, out[-3000:])
    assert "Warning" in out  # other warnings (e.g. nerfstudio's own deprecations) are not hidden
