"""Robustness: bad data and config are refused cleanly, RGB scenes train on their own background,
checkpoints of the other colour backend are refused, the geometry survives autocast and extreme σ,
and the viewer listens on loopback only.

Resume, interruption and determinism runs live in test_robustness_runs.py.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import subprocess
from pathlib import Path
from typing import Callable

import pytest
import torch
from PIL import Image

from conftest import SHARED, TrainedRun, ns, run_cli

from certsdf_ns.certified import CertifiedSDFGrid, certified_sdf_from_smoothed, smooth_occupancy
from certsdf_ns.method.model import CertSDFModelConfig
from certsdf_ns.training.config_checks import check_model_config, largest_fitting_resolution, training_memory_bytes
from certsdf_ns.data.dataparser import CertSDFDataParserConfig
from certsdf_ns.data.validation import BACKGROUND_KEY, validate_blender_split
from certsdf_ns.errors import CertSDFInputError

TINY_MODEL = [
    "--pipeline.model.grid-resolution", "32", "--pipeline.datamanager.train-num-rays-per-batch", "256",
    "--pipeline.model.hash-log2-size", "14", "--pipeline.model.hash-levels", "4", "--pipeline.model.hash-max-res", "64",
]  # fmt: skip


@pytest.fixture(scope="module")
def scene32(tmp_path_factory) -> Path:
    from certsdf_ns.data.scenes import make_scene

    return make_scene(tmp_path_factory.mktemp("robust") / "scene", image_size=32, n_train=20, n_val=2, n_test=2)


def _copy(scene: Path, dst: Path) -> Path:
    shutil.copytree(scene, dst)
    return dst


def _edit_json(path: Path, edit: Callable[[dict], None]) -> None:
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))  # json writes NaN for float("nan"), as some exporters do


def _to_nerfstudio(scene: Path, dst: Path) -> Path:
    """The Blender scene's train split as a nerfstudio transforms.json with explicit intrinsics."""
    dst.mkdir()
    meta = json.loads((scene / "transforms_train.json").read_text())
    shutil.copytree(scene / "train", dst / "images")
    w, h = Image.open(dst / "images" / "r_0.png").size
    focal = 0.5 * w / math.tan(0.5 * meta["camera_angle_x"])
    frames = [{"file_path": f"images/{Path(f['file_path']).name}.png", "transform_matrix": f["transform_matrix"]} for f in meta["frames"]]  # fmt: skip
    ns_meta = {"fl_x": focal, "fl_y": focal, "cx": w / 2, "cy": h / 2, "w": w, "h": h, "frames": frames}
    (dst / "transforms.json").write_text(json.dumps(ns_meta))
    return dst


# --- input validation -----------------------------------------------------------------------------
def _frame_edit(index: int, edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(data: Path) -> None:
        _edit_json(data / "transforms_train.json", lambda m: edit(m["frames"][index]))

    return apply


def _scale_rotation(frame: dict) -> None:
    frame["transform_matrix"] = [[v * (1.1 if j < 3 and i < 3 else 1.0) for j, v in enumerate(row)] for i, row in enumerate(frame["transform_matrix"])]  # fmt: skip


def _mirror(frame: dict) -> None:
    for row in frame["transform_matrix"][:3]:
        row[0] = -row[0]


def _resize_image(data: Path) -> None:
    Image.new("RGBA", (16, 16)).save(data / "train" / "r_6.png")


# (case id, how to break a copy of the scene, substrings the error must contain)
BAD_BLENDER = [
    ("empty", lambda d: [shutil.rmtree(p) if p.is_dir() else p.unlink() for p in list(d.iterdir())], ["is empty"]),
    ("missing-path", lambda d: shutil.rmtree(d), ["does not exist; --data must be a scene folder"]),
    ("not-json", lambda d: (d / "transforms_train.json").write_text('{"frames": [1,'), ["transforms_train.json is not valid JSON", "line 1"]),  # fmt: skip
    ("no-frames", lambda d: _edit_json(d / "transforms_train.json", lambda m: m.pop("frames")), ["transforms_train.json has no 'frames'"]),  # fmt: skip
    ("no-fov", lambda d: _edit_json(d / "transforms_train.json", lambda m: m.pop("camera_angle_x")), ["transforms_train.json: 'camera_angle_x'", "missing"]),  # fmt: skip
    ("missing-image", lambda d: (d / "train" / "r_3.png").unlink(), ["transforms_train.json, frame 3", "r_3.png does not exist"]),  # fmt: skip
    ("garbage-image", lambda d: (d / "train" / "r_4.png").write_bytes(b"not a png"), ["frame 4", "r_4.png cannot be read"]),  # fmt: skip
    ("truncated-image", lambda d: (d / "train" / "r_5.png").write_bytes((d / "train" / "r_5.png").read_bytes()[:300]), ["frame 5", "r_5.png cannot be read"]),  # fmt: skip
    ("mixed-sizes", _resize_image, ["frame 6", "is 16x16", "r_0.png is 32x32", "same size"]),
    ("pose-3x4", _frame_edit(2, lambda f: f.update(transform_matrix=f["transform_matrix"][:3])), ["frame 2", "must be 4x4, got shape (3, 4)"]),  # fmt: skip
    ("pose-nan", _frame_edit(2, lambda f: f["transform_matrix"][0].__setitem__(3, float("nan"))), ["frame 2", "NaN or infinite"]),  # fmt: skip
    ("pose-scaled", _frame_edit(7, _scale_rotation), ["frame 7", "not a rotation", "|RᵀR − I| = 0.21"]),
    ("pose-mirrored", _frame_edit(7, _mirror), ["frame 7", "not a rotation", "det = -1"]),
]


@pytest.mark.parametrize("case,breaker,expected", BAD_BLENDER, ids=[c[0] for c in BAD_BLENDER])
def test_bad_blender_scene_is_refused_with_file_and_frame(case, breaker, expected, scene32, tmp_path, capsys) -> None:
    """The dataparser (what ns-train/ns-eval/ns-export call) exits with status 2 and one message
    naming the file (and frame) instead of raising from inside nerfstudio."""
    data = _copy(scene32, tmp_path / "scene")
    breaker(data)
    with pytest.raises(SystemExit) as exit_info:
        CertSDFDataParserConfig(data=data).setup().get_dataparser_outputs("train")
    assert exit_info.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert err.startswith("certsdf error:"), err
    assert str(data) in err
    for text in expected:
        assert text in err, (text, err)


BAD_NERFSTUDIO = [
    ("no-intrinsics", lambda m: [m.pop("fl_x")], ["transforms.json, frame 0", "intrinsic 'fl_x'"]),
    ("wrong-size", lambda m: m.update(w=64), ["transforms.json, frame 0", "is 32x32 but the transforms declare w=64"]),
    ("no-frames", lambda m: m.update(frames=[]), ["transforms.json has no 'frames'"]),
]


@pytest.mark.parametrize("case,edit,expected", BAD_NERFSTUDIO, ids=[c[0] for c in BAD_NERFSTUDIO])
def test_bad_nerfstudio_scene_is_refused(case, edit, expected, scene32, tmp_path, capsys) -> None:
    data = _to_nerfstudio(scene32, tmp_path / "ns")
    CertSDFDataParserConfig(data=data).setup().get_dataparser_outputs("train")  # the intact copy is accepted
    capsys.readouterr()
    _edit_json(data / "transforms.json", edit)
    with pytest.raises(SystemExit) as exit_info:
        CertSDFDataParserConfig(data=data).setup().get_dataparser_outputs("train")
    assert exit_info.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    for text in expected:
        assert text in err, (text, err)


def test_debug_env_reraises_with_the_original_error(scene32, tmp_path, monkeypatch) -> None:
    data = _copy(scene32, tmp_path / "scene")
    (data / "train" / "r_3.png").unlink()
    monkeypatch.setenv("CERTSDF_DEBUG", "1")
    with pytest.raises(CertSDFInputError, match="frame 3"):
        CertSDFDataParserConfig(data=data).setup().get_dataparser_outputs("train")


def test_rotation_tolerance_accepts_rounding_and_real_data(scene32, tmp_path) -> None:
    """Poses printed with 5 decimals (|RᵀR − I| ~ 1e-5) pass; so does NeRF-synthetic lego when present."""
    data = _copy(scene32, tmp_path / "scene")
    _edit_json(data / "transforms_train.json", lambda m: [f.update(transform_matrix=[[round(v, 5) for v in r] for r in f["transform_matrix"]]) for f in m["frames"]])  # fmt: skip
    assert len(validate_blender_split(data, "train").image_files) == 20
    lego = SHARED / "nerf_synthetic" / "lego"
    if not lego.exists():
        pytest.skip(f"{lego} is absent: real-data check not run")
    for split, count in (("train", 100), ("val", 25)):
        report = validate_blender_split(lego, split)
        assert len(report.image_files) == count and report.has_alpha


# --- RGB images without alpha ---------------------------------------------------------------------
def _rgb_on_white(scene: Path, dst: Path) -> Path:
    data = _copy(scene, dst)
    for png in data.glob("*/r_*.png"):
        rgba = Image.open(png).convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        Image.alpha_composite(white, rgba).convert("RGB").save(png)
    return data


def test_rgb_scene_trains_and_evaluates_on_its_own_background(scene32, tmp_path, capsys) -> None:
    """Blender scene with RGB images: accepted with a warning; the model composites the estimated
    background (white) instead of random colours, so empty space reproduces the background pixels in
    training (random backgrounds would demand geometry there), and evaluation does not add it twice."""
    from certsdf_ns.method_config import certsdf_trainer_config

    data = _rgb_on_white(scene32, tmp_path / "rgb")
    config = copy.deepcopy(certsdf_trainer_config.pipeline)
    config.datamanager.data = data
    config.datamanager.train_num_rays_per_batch = 512
    config.model.grid_resolution, config.model.hash_log2_size, config.model.hash_levels = 32, 12, 2
    pipeline = config.setup(device="cpu", test_mode="val")
    out = " ".join(capsys.readouterr().out.split())
    assert "have no alpha channel" in out and "(1.00, 1.00, 1.00)" in out
    model = pipeline.model
    assert torch.allclose(pipeline.datamanager.train_dataset.metadata[BACKGROUND_KEY], torch.ones(3))
    assert torch.allclose(model.renderer_rgb.background_color, torch.ones(3))

    with torch.no_grad():
        model.field.geometry.logits.fill_(-30.0)  # empty scene
        ray_bundle, batch = pipeline.datamanager.next_train(0)
        background = (batch["image"] > 0.999).all(dim=-1)
        assert background.sum() > 100
        model.train()
        outputs = model(ray_bundle)
        assert (outputs["rgb"][background] - 1.0).abs().max() < 0.02  # loss-free where the image is background
        model.eval()
        outputs = model(ray_bundle)
        assert outputs["rgb"].max() <= 1.0 + 1e-6 and (outputs["rgb"][background] - 1.0).abs().max() < 0.02


# --- configuration ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "field,value,flag",
    [
        ("sigma_voxels", 0.0, "--pipeline.model.sigma-voxels is 0.0"),
        ("sigma_start_voxels", -1.0, "--pipeline.model.sigma-start-voxels is -1.0"),
        ("grid_resolution", 7, "--pipeline.model.grid-resolution is 7"),
        ("grid_start_resolution", 256, "--pipeline.model.grid-start-resolution is 256"),
        ("grid_start_resolution", 4, "--pipeline.model.grid-start-resolution is 4"),
        ("grid_growth_step", -1, "--pipeline.model.grid-growth-step is -1"),
        ("grid_crop_margin", -0.1, "--pipeline.model.grid-crop-margin is -0.1"),
        ("grid_crop_margin", float("nan"), "--pipeline.model.grid-crop-margin is nan"),
        ("eps", 0.5, "--pipeline.model.eps is 0.5"),
        ("eps", 0.0, "--pipeline.model.eps is 0.0"),
    ],
)
def test_invalid_model_config_is_rejected(field, value, flag) -> None:
    cfg = CertSDFModelConfig()
    check_model_config(cfg, available_bytes=None)  # the defaults pass
    setattr(cfg, field, value)
    with pytest.raises(CertSDFInputError, match=flag.replace(".", r"\.")):
        check_model_config(cfg, available_bytes=None)


def test_grid_too_large_for_memory_is_refused_with_a_fitting_suggestion() -> None:
    cfg = CertSDFModelConfig(grid_resolution=512)
    available = 6e9
    with pytest.raises(CertSDFInputError) as err:
        check_model_config(cfg, available_bytes=available)
    fit = largest_fitting_resolution(cfg, available)
    message = str(err.value)
    assert f"needs about {training_memory_bytes(cfg) / 1e9:.1f} GB" in message and "only 6.0 GB is available" in message
    assert f"--pipeline.model.grid-resolution {fit} or lower" in message
    assert 8 <= fit < 512 and fit % 8 == 0
    assert training_memory_bytes(cfg, fit) <= 0.8 * available < training_memory_bytes(cfg, fit + 8)
    cfg.grid_resolution = fit
    check_model_config(cfg, available_bytes=available)  # the suggestion is accepted


def test_cli_refuses_bad_data_and_config_without_traceback(scene32, tmp_path) -> None:
    """Real `ns-train certsdf` processes (run concurrently; bad data, bad config): exit status 2, one-paragraph message on
    stderr naming the file/frame or every bad option, no traceback, no training."""
    broken = _copy(scene32, tmp_path / "broken")
    (broken / "train" / "r_3.png").unlink()
    cases = {  # (a missing --data path goes through the same exit as missing-image; tested in-process)
        "missing-image": (["--data", broken], ["transforms_train.json, frame 3", "r_3.png does not exist"]),
        "bad-config": (
            ["--data", scene32, "--pipeline.model.sigma-voxels=-1", "--pipeline.model.eps=0.7",
             "--pipeline.model.grid-resolution", "4096"],
            ["sigma-voxels is -1.0", "eps is 0.7", "a 4096³ grid needs about", "Use --pipeline.model.grid-resolution"],
        ),  # fmt: skip
    }
    procs = {}
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    for name, (args, _) in cases.items():
        cmd = [ns("ns-train"), "certsdf", *TINY_MODEL, *args, "--output-dir", tmp_path / name, "--vis", "tensorboard"]
        procs[name] = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 2, (name, stdout[-2000:], stderr[-2000:])
        assert "Traceback" not in stdout + stderr, (name, stderr[-3000:])
        err = " ".join(stderr.split())
        assert "certsdf error:" in err
        for text in cases[name][1]:
            assert text in err, (name, text, err[-2000:])
        assert not list((tmp_path / name).rglob("*.ckpt"))


# --- checkpoints of the other colour backend ------------------------------------------------------------
def test_checkpoint_of_other_backend_is_refused(trained_run: TrainedRun, tmp_path, capsys) -> None:
    """The field stores its backend in the checkpoint; loading a 'tcnn' checkpoint into the torch
    model (here through ns-eval's eval_setup) exits with a message instead of keeping random colour
    weights through nerfstudio's strict=False retry."""
    import yaml

    from nerfstudio.utils.eval_utils import eval_setup

    config = yaml.load(trained_run.config.read_text(), Loader=yaml.Loader)
    assert config.pipeline.model.backend == "torch"  # the resolved backend reached config.yml
    ckpt = sorted(trained_run.checkpoint_dir.glob("step-*.ckpt"))[-1]
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["pipeline"]["_model.field._extra_state"] == {"backend": "torch"}
    state["pipeline"]["_model.field._extra_state"] = {"backend": "tcnn"}
    config.output_dir = tmp_path / "outputs"
    config.get_checkpoint_dir().mkdir(parents=True)
    torch.save(state, config.get_checkpoint_dir() / ckpt.name)
    edited = tmp_path / "config.yml"
    edited.write_text(yaml.dump(config))
    with pytest.raises(SystemExit) as exit_info:
        eval_setup(edited, test_mode="inference")
    assert exit_info.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "trained with the 'tcnn' colour backend but this model is built with 'torch'" in err


# --- numerics ---------------------------------------------------------------------------------------
def _ball_grid(sigma_voxels: float, res: int = 24) -> CertifiedSDFGrid:
    """A noisy solid ball: deep inside, p̂ is within 1e-3 of 1, where bf16 cannot resolve 1 − p̂."""
    grid = CertifiedSDFGrid(res, sigma=sigma_voxels * 2.0 / (res - 1))
    inside = grid.grid_points().norm(dim=-1) < 0.6
    noise = torch.randn(res, res, res, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        grid.logits.copy_(torch.where(inside, 6.0, -6.0) + noise)
    return grid


def _sdf_and_grad(grid: CertifiedSDFGrid, x: torch.Tensor, w: torch.Tensor, autocast: bool):
    grid.logits.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        sdf = grid.sdf(x)
        loss = (sdf * w).sum()
    loss.backward()  # outside autocast, as nerfstudio's trainer does
    return sdf.detach(), grid.logits.grad.clone()


def test_geometry_is_float32_under_bf16_autocast() -> None:
    """Under CPU bf16 autocast the smoothing matmuls would run in bf16 (checked below); the grid
    disables autocast for them, so SDF and gradients match float32."""
    grid = _ball_grid(1.5)
    gen = torch.Generator().manual_seed(1)
    x, w = torch.rand(2000, 3, generator=gen) * 2 - 1, torch.randn(2000, generator=gen)
    sdf32, grad32 = _sdf_and_grad(grid, x, w, autocast=False)
    sdf_ac, grad_ac = _sdf_and_grad(grid, x, w, autocast=True)
    assert sdf_ac.dtype == torch.float32 and torch.isfinite(sdf_ac).all() and torch.isfinite(grad_ac).all()
    assert torch.allclose(sdf_ac, sdf32, rtol=0, atol=1e-6)
    assert torch.allclose(grad_ac, grad32, rtol=1e-5, atol=1e-9)
    # The hazard the guard removes: unguarded, p̂ comes out of autocast in bf16 and the SDF is off by
    # more than σ/2 deep inside the ball (1.7σ measured).
    with torch.autocast("cpu", dtype=torch.bfloat16):
        p_bf16 = smooth_occupancy(grid.occupancy(), grid._kernels)
    assert p_bf16.dtype == torch.bfloat16
    unguarded = certified_sdf_from_smoothed(p_bf16, grid.sigma, grid.eps)
    assert (unguarded - grid.sdf_grid().detach()).abs().max() > 0.5 * grid.sigma


@pytest.mark.parametrize("sigma_voxels,warning", [(0.1, "below a quarter voxel"), (60.0, "exceeds the scene box")])
def test_extreme_sigma_is_finite_and_warns(sigma_voxels, warning) -> None:
    with pytest.warns(UserWarning, match=warning):
        grid = _ball_grid(sigma_voxels)
    x = torch.rand(500, 3, generator=torch.Generator().manual_seed(2)) * 2 - 1
    sdf, grad = _sdf_and_grad(grid, x, torch.ones(500), autocast=False)
    assert torch.isfinite(sdf).all() and torch.isfinite(grad).all()
    assert sdf.abs().max() <= grid.max_distance + 1e-6


# --- network exposure ----------------------------------------------------------------------------------
def test_default_viewer_bind_is_loopback() -> None:
    """The method's default; a real `ns-train certsdf --vis viewer` listening on 127.0.0.1 alone (no
    wildcard 0.0.0.0 / ::) is checked by tests/test_viewer_browser.py."""
    from certsdf_ns.method_config import certsdf_trainer_config

    assert certsdf_trainer_config.viewer.websocket_host == "127.0.0.1"
