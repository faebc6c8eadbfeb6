"""`certsdf-bench real`: the DTU conversion for nerfacto, the same-cameras check, the metrics, one tiny run.

- the DTU → transforms.json conversion read back by nerfstudio's parser (through nerfacto's exact
  ns-train command line) gives certsdf's NeuS cameras and split; nerfstudio's default orientation
  would not, and the check says so;
- fruit and cup: both methods' command lines give the same held-out cameras, and a changed split
  is caught;
- silhouette IoU/coverage of a sphere seen by a known camera against analytic disks; PSNR inside
  a mask on a stub model with a known error;
- one run of the suite through the console script on a 10-view DTU copy (certsdf only, ~10 s of
  training), and the refusal of its results folder afterwards.

Everything that needs `../shared/data/real` skips with the reason when it is absent.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from conftest import early_result, early_run, ns, run_cli
from test_real_data import REAL, require_real, small_cup, small_fruit

from certsdf_ns.bench.methods import TrainSettings


def small_dtu10(dst: Path, n_views: int = 10, factor: float = 0.125) -> Path:
    """The first `n_views` views of DTU scan65 at `factor` of their size (100×75): images and masks
    resized, K (rows 0 and 1 of world_mat_i) scaled alike, scale_mat_i kept."""
    src = REAL / "dtu_scan65"
    npz = np.load(src / "cameras_sphere.npz")
    out = {}
    for i in range(n_views):
        world = npz[f"world_mat_{i}"].astype(np.float64).copy()
        world[:2] *= factor
        out[f"world_mat_{i}"], out[f"world_mat_inv_{i}"] = world, np.linalg.inv(world)
        out[f"scale_mat_{i}"] = npz[f"scale_mat_{i}"]
    dst.mkdir(parents=True)
    np.savez(dst / "cameras_sphere.npz", **out)
    for folder in ("image", "mask"):
        files = sorted((src / folder).iterdir())[:n_views]
        w, h = Image.open(files[0]).size
        (dst / folder).mkdir()
        for p in files:
            Image.open(p).resize((round(w * factor), round(h * factor)), Image.Resampling.BILINEAR).save(dst / folder / p.name)
    return dst


@pytest.fixture(scope="module")
def dtu10(tmp_path_factory) -> Path:
    require_real()
    return small_dtu10(tmp_path_factory.mktemp("real") / "dtu10")


SETTINGS = TrainSettings(1024, camera_res_scale_factor=0.5, steps_per_save=10, device="cpu")


# --------------------------------------------------------------------------- DTU conversion


@pytest.mark.parametrize("masks", [True, False])
def test_dtu_conversion_round_trips_the_cameras(dtu10: Path, tmp_path: Path, masks: bool) -> None:
    from certsdf_ns.bench.real import SCENES, CameraMismatchError, compare_heldout, dtu_to_nerfstudio, heldout_outputs, real_spec
    from certsdf_ns.data.neus import NeuSDataParserConfig

    scene = SCENES["dtu_masks" if masks else "dtu_nomasks"]
    out = dtu_to_nerfstudio(dtu10, tmp_path / "ns", masks=masks)
    nerfacto = real_spec("nerfacto", scene, dtu10, [], [])
    neus = NeuSDataParserConfig(data=dtu10).setup()
    for split in ("train", "test"):
        ours = neus.get_dataparser_outputs(split)
        theirs = heldout_outputs(nerfacto, out, SETTINGS, split)  # nerfacto's exact ns-train command line
        assert [Path(f).resolve() for f in theirs.image_filenames] == [Path(f).resolve() for f in ours.image_filenames]
        a, b = ours.cameras, theirs.cameras
        torch.testing.assert_close(b.camera_to_worlds, a.camera_to_worlds, atol=1e-6, rtol=0)
        for key in ("fx", "fy", "cx", "cy"):
            torch.testing.assert_close(getattr(b, key), getattr(a, key), atol=1e-6, rtol=0)
        assert torch.equal(b.width, a.width) and torch.equal(b.height, a.height)
        assert (theirs.mask_filenames is not None) == masks
        assert compare_heldout(ours, theirs, split)["max_abs_c2w"] <= 1e-6
    held_out = [Path(f).name for f in neus.get_dataparser_outputs("test").image_filenames]
    assert held_out == ["000000.png", "000008.png"]  # every 8th view, as certsdf's NeuS parser holds out
    if masks:  # single-channel 0/255, the source mask thresholded at 0.5
        converted = np.asarray(Image.open(out / "mask" / "000008.png"))
        source = np.asarray(Image.open(dtu10 / "mask" / "008.png").convert("L")) / 255.0
        assert converted.ndim == 2 and set(np.unique(converted)) == {0, 255}
        assert np.array_equal(converted == 255, source > 0.5)
    # nerfstudio's own defaults (orient "up", centre, auto-scale) would put nerfacto in another frame.
    reoriented = real_spec("nerfacto", scene, dtu10, [], [])
    reoriented.dataparser = ["nerfstudio-data", "--downscale-factor", "1"]
    with pytest.raises(CameraMismatchError, match="held-out cameras differ"):
        compare_heldout(neus.get_dataparser_outputs("test"), heldout_outputs(reoriented, out, SETTINGS), "default")


def test_both_methods_get_the_same_heldout_cameras(dtu10: Path, tmp_path: Path) -> None:
    """fruit (transforms.json, distortion) and cup (COLMAP): certsdf's presets as nerfacto's dataparser
    options give the same held-out views; a different split is refused; certsdf without masks on DTU."""
    from certsdf_ns.bench.real import SCENES, CameraMismatchError, check_heldout_cameras, dtu_to_nerfstudio, real_spec

    fruit, cup = small_fruit(tmp_path / "fruit"), small_cup(tmp_path / "cup")
    for name, data in (("fruit", fruit), ("cup", cup)):
        scene = SCENES[name]
        specs = {m: (real_spec(m, scene, data, [], []), data) for m in ("certsdf", "nerfacto")}
        reference, found = check_heldout_cameras(specs, SETTINGS, scene)
        assert found["nerfacto"]["views"] == len(reference.image_filenames) >= 8
        assert found["nerfacto"]["max_abs_c2w"] <= 1e-4 and not found["nerfacto"]["masks_in_training"]
        if name == "fruit":  # the capture's lens distortion reached both
            assert float(reference.cameras.distortion_params.abs().max()) > 1e-3
    wrong = {"certsdf": (real_spec("certsdf", SCENES["cup"], cup, [], []), cup),
             "nerfacto": (real_spec("nerfacto", SCENES["cup"], cup, [], ["--eval-interval", "7"]), cup)}  # fmt: skip
    with pytest.raises(CameraMismatchError, match="held-out images"):
        check_heldout_cameras(wrong, SETTINGS, SCENES["cup"])
    # dtu_nomasks: certsdf's use-masks flag reaches its parser; nerfacto's copy has no mask_path.
    scene = SCENES["dtu_nomasks"]
    out = dtu_to_nerfstudio(dtu10, tmp_path / "nomasks", masks=False)
    specs = {"certsdf": (real_spec("certsdf", scene, dtu10, [], []), dtu10), "nerfacto": (real_spec("nerfacto", scene, dtu10, [], []), out)}
    _, found = check_heldout_cameras(specs, SETTINGS, scene)
    assert not found["certsdf"]["masks_in_training"] and not found["nerfacto"]["masks_in_training"]
    with pytest.raises(CameraMismatchError, match="certsdf would train with masks"):
        check_heldout_cameras({"certsdf": (real_spec("certsdf", SCENES["dtu_masks"], dtu10, [], []), dtu10)}, SETTINGS, scene)


# --------------------------------------------------------------------------- metrics


def _camera(n: int, size: int = 200, focal: float = 200.0, distance: float = 3.0):
    """n identical cameras on +z at `distance`, looking at the origin (nerfstudio/OpenGL axes)."""
    from nerfstudio.cameras.cameras import Cameras

    c2w = torch.eye(4)[:3].clone()
    c2w[2, 3] = distance
    return Cameras(camera_to_worlds=c2w[None].repeat(n, 1, 1), fx=focal, fy=focal, cx=size / 2, cy=size / 2,
                   width=size, height=size)  # fmt: skip


def _disk(size: int, radius: float, shift: float = 0.0) -> np.ndarray:
    centre = np.arange(size) + 0.5 - size / 2  # nerfstudio casts rays through pixel centres
    x, y = np.meshgrid(centre - shift, centre)
    return x**2 + y**2 <= radius**2


def test_silhouette_iou_and_coverage_of_a_sphere() -> None:
    from certsdf_ns.bench.meshes import cast_mesh, silhouette_iou_coverage, silhouette_scores

    assert silhouette_iou_coverage(np.array([1, 1, 0, 0], bool), np.array([0, 1, 1, 1], bool)) == (0.25, 1 / 3)
    size, focal, distance, r = 200, 200.0, 3.0, 0.5
    sphere = trimesh.creation.icosphere(subdivisions=5, radius=r)
    radius_px = focal * r / math.sqrt(distance**2 - r**2)  # the tangent cone's circle: 33.8 px
    shift = 20.0
    cameras = _camera(2, size, focal, distance)
    hit = cast_mesh(sphere, cameras[0:1]).hit
    assert abs(hit.sum() / (math.pi * radius_px**2) - 1.0) < 0.02
    scores = silhouette_scores(sphere, cameras, [_disk(size, radius_px), _disk(size, radius_px, shift)], ["centred", "shifted"])
    centred, shifted = scores["per_view"]
    assert centred["iou"] > 0.97 and centred["coverage"] > 0.98
    # Two disks of radius R, centres s apart: lens area L; IoU = L / (2A − L), coverage = L / A.
    area = math.pi * radius_px**2
    lens = 2 * radius_px**2 * math.acos(shift / (2 * radius_px)) - shift / 2 * math.sqrt(4 * radius_px**2 - shift**2)
    assert shifted["iou"] == pytest.approx(lens / (2 * area - lens), abs=0.02)  # 0.46
    assert shifted["coverage"] == pytest.approx(lens / area, abs=0.02)  # 0.63
    assert scores["iou"] == pytest.approx((centred["iou"] + shifted["iou"]) / 2)
    assert silhouette_scores(trimesh.Trimesh(), cameras[0:1], [_disk(size, radius_px)], ["empty"])["iou"] == 0.0


def test_heldout_metrics_psnr_inside_the_mask() -> None:
    """A stub model that errs by 0.1 inside the mask only: 20 dB there, 20 − 10·log10(f) dB over the image."""
    from certsdf_ns.bench.evaluate import HeldOutViews, heldout_metrics

    size = 40
    rng = np.random.default_rng(0)
    images = [torch.from_numpy(rng.uniform(0.2, 0.8, (size, size, 3)).astype(np.float32)) for _ in range(2)]
    masks = [torch.from_numpy(_disk(size, 10.0, shift)) for shift in (0.0, 5.0)]

    class Model(torch.nn.Module):
        calls = 0

        def get_outputs_for_camera(self, camera):
            i = Model.calls
            Model.calls += 1
            return {"rgb": images[i] + 0.1 * masks[i][..., None].float()}

    class Pipeline:
        model, device = Model(), "cpu"

    views = HeldOutViews(["a", "b"], [Path("a"), Path("b")], _camera(2, size, 40.0), images, masks)
    m = heldout_metrics(Pipeline(), views, step=7)
    fraction = float(masks[0].float().mean())
    assert m.step == 7 and m.n_views == 2 and [v.view for v in m.views] == ["a", "b"]
    assert m.psnr_masked == pytest.approx(20.0, abs=1e-3)
    assert m.views[0].psnr == pytest.approx(20.0 - 10 * math.log10(fraction), abs=1e-3)
    assert 0.0 < m.ssim < 1.0 and m.render_s_per_view >= 0.0


# --------------------------------------------------------------------------- the suite end to end

TINY = [  # 20 s: enough steps for a surface (IoU ~0.85 idle) also when the machine is busy (10 s gave IoU 0.26 at load 3.4)
    "--budget-s", "20", "--trial.eval-points", "1", "--trial.rays-per-batch", "512",
    "--trial.steps-per-save.certsdf", "5", "--trial.certsdf-mesh-resolution", "48",
    "--trial.extra-args", "certsdf:--pipeline.model.grid-resolution 32 --pipeline.model.hash-log2-size 12 "
    "--pipeline.model.hash-levels 4 --pipeline.model.hash-max-res 64",
]  # fmt: skip


def _real_suite(folder: Path):
    require_real()
    dtu10, results = small_dtu10(folder / "dtu10"), folder / "bench"
    args = [ns("certsdf-bench"), "real", "--scene-names", "dtu_masks", "--methods", "certsdf", "--data.dtu", dtu10,
            "--scale", "0.5", "--results-dir", results, *TINY]  # fmt: skip
    return args, {"timeout": 600}, (args, results)


early_run("real_suite", _real_suite)


def test_real_suite_on_a_small_dtu_copy() -> None:
    proc, (args, results) = early_result("real_suite")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = results / "real"
    record = json.loads((out / "certsdf_dtu_masks.json").read_text())
    assert record["status"] == "ok", record["reason"]
    assert record["training"]["stopped_by"] == "budget" and record["training"]["rays_per_sec"] > 0
    assert record["heldout_views"] == ["0", "8"] and record["camera_res_scale_factor"] == 0.5
    assert record["camera_check"]["masks_in_training"] and record["camera_check"]["max_abs_c2w"] == 0.0
    evals = record["evaluations"]
    assert len(evals) >= 2  # the first checkpoint and the budget's
    for e in evals:
        assert 5.0 < e["psnr"] < 50.0 and 3.0 < e["psnr_masked"] < 50.0 and 0.0 < e["ssim"] <= 1.0
        assert [v["view"] for v in e["views"]] == ["0", "8"] and e["render_s_per_view"] > 0
    meshes = record["meshes"]
    assert [m["step"] for m in meshes] == [e["step"] for e in evals]
    assert all(m["method"] == "certsdf-grid" and m["status"] in ("ok", "empty") for m in meshes)
    last = meshes[-1]
    assert last["status"] == "ok", last  # 20 s of training form a surface on this copy
    assert 0.3 < last["iou"] <= 1.0 and 0.3 < last["coverage"] <= 1.0 and len(last["per_view"]) == 2
    picture = Image.open(out / last["picture"])
    assert last["picture_view"] == "8" and picture.size == (2 * 50 + 4, 37)  # mesh | gap | photo at 50×37
    grey = np.asarray(picture)[:, :50]
    assert (grey < 250).any() and (grey == 255).any()  # the mesh and the background both in the picture
    assert Path(last["path"]).is_file()  # the last certsdf mesh is kept
    usable = record["first_usable_mesh"]
    first = next((m for m in meshes if (m.get("iou") or 0.0) >= 0.9), None)
    assert usable["metric"] == "iou" and usable["reached"] == (first is not None)
    assert usable.get("step") == (first["step"] if first else None)
    suite = json.loads((out / "suite.json").read_text())
    assert suite["machine"]["logical_cores"] >= 1 and "first_usable_mesh" in suite["definitions"]
    with open(out / "summary.csv", newline="") as f:
        kinds = {row["kind"] for row in csv.DictReader(f)}
    assert kinds == {"eval", "usable_mesh"}
    md = (out / "summary.md").read_text()
    assert "#### dtu_masks" in md and "| PSNR masked |" in md and f"| {last['iou']:.3f} |" in md
    assert "minutes to the first usable certsdf mesh (iou ≥ 0.9)" in md
    assert (out / "dtu_masks_psnr.png").is_file() and (out / "dtu_masks_silhouette.png").is_file()
    # A folder holding runs is refused before anything is converted or trained.
    again = run_cli(args, timeout=300)
    assert again.returncode == 2 and "already holds a trained run" in again.stderr
