"""`certsdf-demo` end to end, as a user runs it (Python's default warning filters), on a smaller scene
than its defaults (32 px images, a 32³ grid, 512 rays, 60 steps: ~30 s of CPU instead of ~2 minutes).

It renders the scene, trains through the real `ns-train`, prints the test PSNR, the exported mesh's
Chamfer-L1 and F-score, writes the picture and prints the viewer command; its console holds no
warning of another package. The quality of its defaults (PSNR ≥ 28 dB, Chamfer-L1 ≤ 0.01 at 100 px,
128³, 200 steps) is measured with the command in the README, not here.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image

from conftest import early_result, early_run, ns, warning_lines

from certsdf_ns.demo import PANEL


def _demo(folder: Path):
    args = [ns("certsdf-demo"), "--scene-dir", "scene", "--output-dir", "outputs", "--picture", "demo.png",
            "--image-size", 32, "--steps", 60, "--grid-resolution", 32, "--rays", 512]  # fmt: skip
    return args, {"timeout": 600, "cwd": folder, "env_extra": {"PYTHONWARNINGS": None}}, folder


early_run("demo", _demo)


def test_demo_prints_its_metrics_writes_the_picture_and_no_warnings() -> None:
    proc, tmp_path = early_result("demo")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert warning_lines(out) == []

    assert "rendering the demo scene into scene" in proc.stdout and (tmp_path / "scene" / "gt_mesh.ply").is_file()
    assert "trained 60 steps in" in proc.stdout
    psnr = re.search(r"test PSNR ([\d.]+) dB, SSIM ([\d.]+) \(10 test views\)", proc.stdout)
    assert psnr and 15.0 < float(psnr.group(1)) < 60.0 and 0.5 < float(psnr.group(2)) <= 1.0, proc.stdout[-2000:]
    mesh = re.search(r"mesh (\S+): Chamfer-L1 ([\d.]+), F@0.01 ([\d.]+), F@0.02 ([\d.]+) against", proc.stdout)
    assert mesh, proc.stdout[-2000:]
    # 60 steps on a 32³ grid already give a surface near the truth (measured Chamfer-L1 0.031, F@0.02 0.58).
    assert (tmp_path / mesh.group(1)).is_file() and float(mesh.group(2)) < 0.1 and float(mesh.group(4)) > 0.2

    picture = np.asarray(Image.open(tmp_path / "demo.png").convert("RGB"))
    assert picture.shape == (PANEL + 18, 4 * PANEL, 3)
    for i in range(4):  # every panel holds a picture, not a blank tile
        assert picture[18:, i * PANEL : (i + 1) * PANEL].std() > 5, i
    viewer = re.search(r"open the viewer:  ns-viewer --load-config (\S+) --viewer.websocket-host 127.0.0.1", proc.stdout)
    assert viewer and (tmp_path / viewer.group(1)).is_file(), proc.stdout[-2000:]
