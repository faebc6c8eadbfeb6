"""Real captures: NeuS/IDR (DTU), COLMAP and nerfstudio transforms.json scenes.

Detection, the NeuS camera decomposition (a known camera round-trips), the frame of exported
meshes (a point of the unit sphere lands where DTU's frame says), object masks in the batch and
the loss, distortion, real-capture detection, bad input through the real CLI, and short
`ns-train certsdf --data …` runs on downscaled copies of `../shared/data/real/` made at test time.
Tests that need the shared captures skip, with the reason, only when they are absent.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from concurrent.futures import Future
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from conftest import SHARED, ns, start_cli_runs, warning_lines

from certsdf_ns.data.datamanager import CertSDFDataset
from certsdf_ns.data.dataparser import CertSDFDataParserConfig, DataFormatError, detect_format
from certsdf_ns.data.neus import decompose_projection, opencv_to_opengl, world_to_sphere
from certsdf_ns.data.validation import FOREGROUND_MASKS_KEY, MASK_BATCH_KEY, REAL_CAPTURE_KEY, REGION_KEY
from certsdf_ns.export.mesh_export import to_original_frame
from certsdf_ns.export.run import read_frame

REAL = SHARED / "real"
needs_real = pytest.mark.skipif(not REAL.is_dir(), reason=f"{REAL} is absent: the shared real captures are not mounted")
# Every CLI run: one step of a tiny model, no viewer.
CLI_ARGS = [
    "--vis", "tensorboard", "--viewer.quit-on-train-completion", "True",
    "--pipeline.model.grid-resolution", "16", "--pipeline.model.hash-log2-size", "12",
    "--pipeline.model.hash-levels", "2", "--pipeline.model.hash-max-res", "32",
    "--pipeline.datamanager.train-num-rays-per-batch", "256",
]  # fmt: skip


# --------------------------------------------------------------------------- downscaled copies
def _resize_folder(src: Path, dst: Path, size: Tuple[int, int], names: List[str] | None = None) -> None:
    dst.mkdir(parents=True)
    for path in sorted(src.iterdir()):
        if names is None or path.name in names:
            Image.open(path).resize(size, Image.Resampling.BILINEAR).save(dst / path.name)


def small_dtu(dst: Path, factor: float = 0.1) -> Path:
    """DTU scan65 at 80×60: images and masks resized, K (rows 0 and 1 of world_mat) scaled alike."""
    src = REAL / "dtu_scan65"
    npz = dict(np.load(src / "cameras_sphere.npz"))
    for key in list(npz):
        if key.startswith("world_mat_") and not key.startswith("world_mat_inv"):
            world = npz[key].astype(np.float64).copy()
            world[:2] *= factor
            npz[key] = world
            npz[key.replace("world_mat_", "world_mat_inv_")] = np.linalg.inv(world)
    dst.mkdir(parents=True)
    np.savez(dst / "cameras_sphere.npz", **npz)
    w, h = Image.open(src / "image" / "000000.png").size
    size = (round(w * factor), round(h * factor))
    _resize_folder(src / "image", dst / "image", size)
    _resize_folder(src / "mask", dst / "mask", size)
    return dst


def small_fruit(dst: Path, factor: float = 0.125) -> Path:
    """fruit at 76×101: transforms.json intrinsics scaled to the resized images (distortion kept)."""
    src = REAL / "fruit"
    meta = json.loads((src / "transforms.json").read_text())
    w, h = round(meta["w"] * factor), round(meta["h"] * factor)
    sx, sy = w / meta["w"], h / meta["h"]
    meta.update(w=w, h=h, fl_x=meta["fl_x"] * sx, cx=meta["cx"] * sx, fl_y=meta["fl_y"] * sy, cy=meta["cy"] * sy)
    folder = Path(meta["frames"][0]["file_path"]).parent.name
    _resize_folder(src / folder, dst / folder, (w, h))
    (dst / "transforms.json").write_text(json.dumps(meta))
    return dst


def small_cup(dst: Path, factor: float = 0.1) -> Path:
    """cup_colmap at 80×60: cameras.bin rewritten with nerfstudio's COLMAP writer, images.bin as is."""
    from nerfstudio.data.utils import colmap_parsing_utils as colmap_utils

    src = REAL / "cup_colmap"
    (dst / "sparse" / "0").mkdir(parents=True)
    cameras = colmap_utils.read_cameras_binary(src / "sparse" / "0" / "cameras.bin")
    small = {}
    for cid, cam in cameras.items():
        assert cam.model == "SIMPLE_PINHOLE"  # f, cx, cy: all scale with the image
        w, h = round(cam.width * factor), round(cam.height * factor)
        small[cid] = cam._replace(width=w, height=h, params=np.asarray(cam.params) * (w / cam.width))
    colmap_utils.write_cameras_binary(small, dst / "sparse" / "0" / "cameras.bin")
    shutil.copy(src / "sparse" / "0" / "images.bin", dst / "sparse" / "0" / "images.bin")
    w, h = Image.open(src / "images" / "1.jpg").size
    _resize_folder(src / "images", dst / "images", (round(w * factor), round(h * factor)))
    return dst


def require_real() -> None:
    """Skip (with the reason) only where the shared captures are not mounted; CI has them."""
    if not REAL.is_dir():
        pytest.skip(f"{REAL} is absent: the shared real captures are not mounted")


@pytest.fixture(scope="module")
def dtu(tmp_path_factory) -> Path:
    require_real()
    return small_dtu(tmp_path_factory.mktemp("real") / "dtu")


@pytest.fixture(scope="module")
def fruit(tmp_path_factory) -> Path:
    require_real()
    return small_fruit(tmp_path_factory.mktemp("real") / "fruit")


@pytest.fixture(scope="module")
def cup(tmp_path_factory) -> Path:
    require_real()
    return small_cup(tmp_path_factory.mktemp("real") / "cup")


# --------------------------------------------------------------------------- detection
def test_detect_format_for_each_layout(tmp_path) -> None:
    layouts = {
        "blender": ["transforms_train.json"],
        "nerfstudio": ["transforms.json", "images/a.png"],
        "neus": ["cameras_sphere.npz", "image/000.png", "mask/000.png"],
        "colmap": ["sparse/0/cameras.bin", "sparse/0/images.bin", "images/a.jpg"],
        "colmap-ns-process-data": ["colmap/sparse/0/cameras.txt", "colmap/sparse/0/images.txt", "images/a.jpg"],
    }
    for name, files in layouts.items():
        for rel in files:
            (tmp_path / name / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name / rel).touch()
        assert detect_format(tmp_path / name) == name.split("-")[0], name
    unknown = tmp_path / "unknown"
    (unknown / "photos").mkdir(parents=True)
    with pytest.raises(DataFormatError) as err:
        detect_format(unknown)
    message = str(err.value)
    assert str(unknown) in message and "photos/" in message
    for needed in ("transforms_train.json", "transforms.json", "cameras_sphere.npz", "world_mat_i", "image/",
                   "sparse/0/cameras.bin", "sparse/0/images.bin", "images/"):  # fmt: skip
        assert needed in message, (needed, message)


@needs_real
def test_detect_format_of_the_shared_captures() -> None:
    assert detect_format(REAL / "dtu_scan65") == "neus"
    assert detect_format(REAL / "fruit") == "nerfstudio"
    assert detect_format(REAL / "cup_colmap") == "colmap"


# --------------------------------------------------------------------------- NeuS cameras
def _rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def _neus_camera(rng: np.random.Generator):
    """A known K, world-to-camera [R|t] (DTU-like: millimetres, camera ~600 mm from the object) and scale_mat."""
    K = np.array([[1400.0 + 50 * rng.random(), 0.0, 400.0 + 10 * rng.random()],
                  [0.0, 1390.0 + 50 * rng.random(), 300.0 + 10 * rng.random()],
                  [0.0, 0.0, 1.0]])  # fmt: skip
    R = _rotation(rng)
    centre_mm = np.array([30.0, -20.0, 600.0]) + rng.normal(size=3) * 50
    t = -R @ centre_mm
    s, Rs, c = 160.0 + 10 * rng.random(), _rotation(rng), rng.normal(size=3) * 30
    scale_mat = np.eye(4)
    scale_mat[:3, :3], scale_mat[:3, 3] = s * Rs, c
    world_mat = np.eye(4)
    world_mat[:3, :4] = K @ np.concatenate([R, t[:, None]], axis=1)
    return K, R, centre_mm, scale_mat, world_mat


def test_neus_decomposition_round_trip() -> None:
    """P = world_mat · scale_mat decomposes into the K we built and the pose of the camera in the unit-sphere frame."""
    rng = np.random.default_rng(0)
    for _ in range(5):
        K, R, centre_mm, scale_mat, world_mat = _neus_camera(rng)
        K2, c2w = decompose_projection((world_mat @ scale_mat)[:3, :4])
        np.testing.assert_allclose(K2, K, rtol=1e-9, atol=1e-6)
        s, Rs, c = np.cbrt(np.linalg.det(scale_mat[:3, :3])), scale_mat[:3, :3] / np.cbrt(np.linalg.det(scale_mat[:3, :3])), scale_mat[:3, 3]  # fmt: skip
        # x_world = s·Rs·x_sphere + c, so the camera centre and axes in the sphere frame are:
        np.testing.assert_allclose(c2w[:3, 3], Rs.T @ (centre_mm - c) / s, atol=1e-9)
        np.testing.assert_allclose(c2w[:3, :3], Rs.T @ R.T, atol=1e-9)
        # OpenGL axes: x kept, y and z flipped (the camera looks down its -z).
        gl = opencv_to_opengl(c2w)
        np.testing.assert_allclose(gl[:3, 0], c2w[:3, 0])
        np.testing.assert_allclose(gl[:3, 1:3], -c2w[:3, 1:3])
        # The dataparser transform maps world to sphere: x_sphere = k·(T·[x_world; 1]).
        T, k = world_to_sphere(scale_mat, "scale_mat")
        x_world = centre_mm
        np.testing.assert_allclose(k * (T @ np.append(x_world, 1.0)), c2w[:3, 3], atol=1e-9)


def _write_neus_scene(root: Path, n: int = 9, size: Tuple[int, int] = (40, 30), masks: bool = True):
    """A NeuS/IDR folder with n known cameras looking at the origin; returns (world_mats, scale_mat)."""
    rng = np.random.default_rng(1)
    scale_mat = np.diag([150.0, 150.0, 150.0, 1.0])
    scale_mat[:3, 3] = [10.0, -5.0, 500.0]
    K = np.array([[50.0, 0, 20.3], [0, 52.0, 14.6], [0, 0, 1]])
    arrays, worlds = {}, []
    for i in range(n):
        angle = 2 * math.pi * i / n
        eye = scale_mat[:3, 3] + 450.0 * np.array([math.cos(angle), math.sin(angle), 0.3 + 0.1 * rng.random()])
        forward = scale_mat[:3, 3] - eye
        forward /= np.linalg.norm(forward)
        right = np.cross(forward, [0.0, 0.0, 1.0])
        right /= np.linalg.norm(right)
        down = np.cross(forward, right)
        R = np.stack([right, down, forward])  # OpenCV world-to-camera rows
        world = np.eye(4)
        world[:3, :4] = K @ np.concatenate([R, (-R @ eye)[:, None]], axis=1)
        arrays[f"world_mat_{i}"], arrays[f"scale_mat_{i}"] = world, scale_mat
        worlds.append(world)
    root.mkdir(parents=True)
    np.savez(root / "cameras_sphere.npz", **arrays)
    for sub in ("image",) + (("mask",) if masks else ()):
        (root / sub).mkdir()
        for i in range(n):
            picture = Image.new("RGB", size, (40 * (i % 6), 90, 200))
            if sub == "mask":  # an object (white) on black: masks without a boundary would be dropped
                picture = Image.new("L", size)
                picture.paste(255, (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2))
            picture.save(root / sub / f"{i:06d}.png")
    return worlds, scale_mat


def test_neus_parser_rays_pass_through_projected_points(tmp_path, capsys) -> None:
    """A world point projected by world_mat_i into pixel (u, v) (OpenCV: pixel centres at integers)
    lies on the nerfstudio ray through that pixel, in the unit-sphere frame; every 8th view is held out."""
    worlds, scale_mat = _write_neus_scene(tmp_path / "neus")
    parser = CertSDFDataParserConfig(data=tmp_path / "neus").setup()
    train, val = parser.get_dataparser_outputs("train"), parser.get_dataparser_outputs("val")
    assert parser.format == "neus"
    assert [p.name for p in val.image_filenames] == ["000000.png", "000008.png"]
    assert len(train.image_filenames) == 7 and train.mask_filenames is not None and len(train.mask_filenames) == 7
    assert torch.equal(train.scene_box.aabb, torch.tensor([[-1.0] * 3, [1.0] * 3]))
    assert train.metadata[FOREGROUND_MASKS_KEY] and train.metadata[REAL_CAPTURE_KEY]
    x_world = scale_mat[:3, 3] + np.array([20.0, -30.0, 15.0])
    x_sphere = np.linalg.solve(scale_mat, np.append(x_world, 1.0))[:3]
    for j, name in enumerate(train.image_filenames):
        i = int(name.stem)
        uvw = worlds[i][:3] @ np.append(x_world, 1.0)
        u, v = uvw[0] / uvw[2], uvw[1] / uvw[2]
        ray = train.cameras.generate_rays(camera_indices=j, coords=torch.tensor([[v + 0.5, u + 0.5]], dtype=torch.float32))
        o, d = ray.origins[0].double().numpy(), ray.directions[0].double().numpy()
        distance = np.linalg.norm(np.cross(x_sphere - o, d)) / np.linalg.norm(d)
        assert distance < 1e-4, (i, distance)
    two = CertSDFDataParserConfig(data=tmp_path / "neus", eval_every=2).setup()
    assert len(two.get_dataparser_outputs("val").image_filenames) == 5


@needs_real
def test_mesh_frame_goes_back_to_dtu_millimetres(tmp_path) -> None:
    """A mesh vertex at x in the unit sphere comes back as scale_mat · x (DTU's frame, millimetres) after
    undoing the saved dataparser transform the way certsdf-export does."""
    outputs = CertSDFDataParserConfig(data=REAL / "dtu_scan65").setup().get_dataparser_outputs("train")
    outputs.save_dataparser_transform(tmp_path / "dataparser_transforms.json")
    transform, scale = read_frame(tmp_path)
    scale_mat = np.load(REAL / "dtu_scan65" / "cameras_sphere.npz")["scale_mat_0"].astype(np.float64)
    sphere = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, -0.5, 0.5], [0.3, 0.2, -0.9]])
    mesh = trimesh.Trimesh(sphere, [[0, 1, 2], [0, 2, 3]], process=False)
    world = to_original_frame(mesh, transform, scale).vertices
    expected = (scale_mat @ np.c_[sphere, np.ones(len(sphere))].T).T[:, :3]
    # float32 in the saved transform: ~1e-4 mm at DTU's 640 mm
    np.testing.assert_allclose(world, expected, atol=2e-3)
    np.testing.assert_allclose(world[0], [-28.094833, -27.979301, 640.4341], atol=2e-3)  # the sphere's centre, mm


# --------------------------------------------------------------------------- masks
@pytest.fixture(scope="module")
def dtu_pipeline(dtu):
    from certsdf_ns.method_config import certsdf_trainer_config

    config = copy.deepcopy(certsdf_trainer_config.pipeline)
    config.datamanager.data = dtu
    config.datamanager.train_num_rays_per_batch = 2048
    config.model.grid_resolution, config.model.hash_log2_size, config.model.hash_levels = 16, 12, 2
    return config.setup(device="cpu", test_mode="val")


@needs_real
def test_masks_reach_the_batch_without_restricting_sampling(dtu, dtu_pipeline) -> None:
    datamanager = dtu_pipeline.datamanager
    _, batch = datamanager.next_train(0)
    assert MASK_BATCH_KEY in batch and "mask" not in batch
    mask = batch[MASK_BATCH_KEY]
    assert mask.shape == (2048, 1) and mask.dtype == torch.float32
    # Rays are drawn everywhere: the fraction inside the objects matches the masks' own.
    files = datamanager.train_dataset.object_mask_filenames
    overall = float(np.mean([np.asarray(Image.open(p).convert("L")) > 127 for p in files]))
    inside = float((mask > 0.5).float().mean())
    assert 0.05 < overall < 0.95 and abs(inside - overall) < 0.05, (inside, overall)


@needs_real
def test_masks_supervise_accumulation_and_report_masked_psnr(dtu_pipeline) -> None:
    model, datamanager = dtu_pipeline.model, dtu_pipeline.datamanager
    model.train()
    ray_bundle, batch = datamanager.next_train(1)
    outputs = model(ray_bundle)
    loss = model.get_loss_dict(outputs, batch)
    accumulation = outputs["accumulation"].clamp(1e-5, 1 - 1e-5)
    expected = model.config.alpha_loss_mult * torch.nn.functional.binary_cross_entropy(accumulation, batch[MASK_BATCH_KEY])
    torch.testing.assert_close(loss["alpha_loss"], expected)
    flipped = dict(batch, **{MASK_BATCH_KEY: 1.0 - batch[MASK_BATCH_KEY]})
    assert not torch.isclose(model.get_loss_dict(outputs, flipped)["alpha_loss"], loss["alpha_loss"])
    without = {k: v for k, v in batch.items() if k != MASK_BATCH_KEY}
    assert "alpha_loss" not in model.get_loss_dict(outputs, without)  # RGB images and no mask: RGB only

    model.eval()
    camera, image_batch = datamanager.next_eval_image(0)
    assert image_batch[MASK_BATCH_KEY].shape == (60, 80, 1)
    with torch.no_grad():
        outputs = model.get_outputs_for_camera(camera)
    metrics, _ = model.get_image_metrics_and_images(outputs, image_batch)
    assert math.isfinite(metrics["psnr_masked"]) and math.isfinite(metrics["psnr"])


def _blender_to_nerfstudio(scene: Path, dst: Path) -> Path:
    meta = json.loads((scene / "transforms_train.json").read_text())
    shutil.copytree(scene / "train", dst / "images")
    w, h = Image.open(dst / "images" / "r_0.png").size
    focal = 0.5 * w / math.tan(0.5 * meta["camera_angle_x"])
    (dst / "masks").mkdir()
    frames = []
    for f in meta["frames"]:
        name = Path(f["file_path"]).name
        Image.open(dst / "images" / f"{name}.png").getchannel("A").save(dst / "masks" / f"{name}.png")
        frames.append({"file_path": f"images/{name}.png", "mask_path": f"masks/{name}.png", "transform_matrix": f["transform_matrix"]})  # fmt: skip
    ns_meta = {"fl_x": focal, "fl_y": focal, "cx": w / 2, "cy": h / 2, "w": w, "h": h, "frames": frames}
    (dst / "transforms.json").write_text(json.dumps(ns_meta))
    return dst


def test_transforms_json_mask_path_keeps_nerfstudio_meaning_unless_asked(tmp_path) -> None:
    """mask_path in transforms.json: nerfstudio's sampling masks by default (batch 'mask'), object
    masks with --pipeline.datamanager.dataparser.mask-role object (batch 'certsdf_mask')."""
    from certsdf_ns.data.scenes import make_scene

    data = _blender_to_nerfstudio(make_scene(tmp_path / "scene", image_size=16, n_train=4, n_val=1, n_test=1), tmp_path / "ns")
    sampling = CertSDFDataParserConfig(data=data).setup().get_dataparser_outputs("train")
    assert sampling.mask_filenames is not None and sampling.metadata[FOREGROUND_MASKS_KEY] is False
    item = CertSDFDataset(sampling)[0]
    assert "mask" in item and MASK_BATCH_KEY not in item
    obj = CertSDFDataParserConfig(data=data, mask_role="object").setup().get_dataparser_outputs("train")
    item = CertSDFDataset(obj)[0]
    assert "mask" not in item and item[MASK_BATCH_KEY].shape == (16, 16, 1)
    assert 0.0 < float(item[MASK_BATCH_KEY].mean()) < 1.0


def _bad_mask_paths(data: Path, case: str) -> None:
    meta = json.loads((data / "transforms.json").read_text())
    if case == "partial":
        del meta["frames"][2]["mask_path"]
    elif case == "wrong-size":
        Image.new("L", (8, 8)).save(data / meta["frames"][1]["mask_path"])
    elif case == "rgb-sampling-mask":
        Image.open(data / meta["frames"][3]["mask_path"]).convert("RGB").save(data / meta["frames"][3]["mask_path"])
    elif case == "missing":
        (data / meta["frames"][0]["mask_path"]).unlink()
    (data / "transforms.json").write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "case,expected",
    [
        ("partial", ["transforms.json: 3 of 4 frames have a 'mask_path' (frame 2 has none)"]),
        ("wrong-size", ["transforms.json, frame 1", "is 8x8 but its image", "is 16x16"]),
        ("rgb-sampling-mask", ["transforms.json, frame 3", "has 3 channels (RGB)", "single-channel"]),
        ("missing", ["transforms.json, frame 0", "does not exist"]),
    ],
)
def test_bad_mask_path_is_refused_with_the_file(case, expected, tmp_path, capsys) -> None:
    """transforms.json masks that nerfstudio would trip over later (an assert, a shape mismatch in the
    dataloader): exit status 2 and the file named, before any image is loaded."""
    from certsdf_ns.data.scenes import make_scene

    data = _blender_to_nerfstudio(make_scene(tmp_path / "scene", image_size=16, n_train=4, n_val=1, n_test=1), tmp_path / "ns")
    _bad_mask_paths(data, case)
    with pytest.raises(SystemExit) as exit_info:
        CertSDFDataParserConfig(data=data).setup().get_dataparser_outputs("train")
    assert exit_info.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert str(data) in err
    for text in expected:
        assert text in err, (text, err)


# --------------------------------------------------------------------------- distortion, real captures
@needs_real
def test_transforms_json_distortion_is_honoured(fruit) -> None:
    meta = json.loads((fruit / "transforms.json").read_text())
    outputs = CertSDFDataParserConfig(data=fruit).setup().get_dataparser_outputs("train")
    cameras = outputs.cameras
    expected = torch.tensor([meta["k1"], meta["k2"], meta["k3"], meta["k4"], meta["p1"], meta["p2"]], dtype=torch.float32)
    torch.testing.assert_close(cameras.distortion_params[0], expected)
    assert outputs.metadata[REAL_CAPTURE_KEY] is True
    corner = torch.tensor([[0.5, 0.5]])
    distorted = cameras.generate_rays(camera_indices=0, coords=corner).directions
    plain = copy.deepcopy(cameras)
    plain.distortion_params = None
    undistorted = plain.generate_rays(camera_indices=0, coords=corner).directions
    assert float((distorted - undistorted).norm()) > 1e-3  # the rays are undistorted by nerfstudio


@needs_real
def test_colmap_lens_distortion_reaches_nerfstudio_cameras(cup, tmp_path) -> None:
    """An OPENCV camera (fx fy cx cy k1 k2 p1 p2) in cameras.bin: nerfstudio's COLMAP parser puts
    k1 k2 p1 p2 into the Cameras, and the scene is a real capture split every 8th view."""
    from nerfstudio.data.utils import colmap_parsing_utils as colmap_utils

    data = tmp_path / "cup"
    shutil.copytree(cup, data)
    cameras = colmap_utils.read_cameras_binary(data / "sparse" / "0" / "cameras.bin")
    opencv = {cid: cam._replace(model="OPENCV", params=np.array([cam.params[0], cam.params[0], cam.params[1], cam.params[2], -0.05, 0.01, 0.002, -0.001]))
              for cid, cam in cameras.items()}  # fmt: skip
    colmap_utils.write_cameras_binary(opencv, data / "sparse" / "0" / "cameras.bin")
    parser = CertSDFDataParserConfig(data=data).setup()
    train, val = parser.get_dataparser_outputs("train"), parser.get_dataparser_outputs("val")
    assert parser.format == "colmap" and len(train.image_filenames) + len(val.image_filenames) == 77
    assert len(val.image_filenames) == 10  # views 0, 8, …, 72
    torch.testing.assert_close(train.cameras.distortion_params[0], torch.tensor([-0.05, 0.01, 0.0, 0.0, 0.002, -0.001]))
    assert train.metadata[REAL_CAPTURE_KEY] is True and "points3D_xyz" not in train.metadata


def _points_around_the_region(outputs, fraction: float, n: int = 600) -> np.ndarray:
    """n points on a sphere of `fraction` region radii around the region's centre, in the scene's own
    frame (the dataparser maps x to scale · (T[:, :3] x + T[:, 3]))."""
    cx, cy, cz, radius = outputs.metadata[REGION_KEY].tolist()
    rng = np.random.default_rng(5)
    d = rng.normal(size=(n, 3))
    ns_points = np.array([cx, cy, cz]) + fraction * radius * d / np.linalg.norm(d, axis=1, keepdims=True)
    t = outputs.dataparser_transform.double().numpy()
    return (ns_points / outputs.dataparser_scale - t[:, 3]) @ np.linalg.inv(t[:, :3]).T


def _assert_tightened(plain, tightened, fraction: float) -> None:
    from certsdf_ns.data.region import SPARSE_MARGIN

    before, after = plain.metadata[REGION_KEY], tightened.metadata[REGION_KEY]
    torch.testing.assert_close(after[:3], before[:3], atol=1e-4, rtol=0)  # the centre stays
    assert float(after[3]) == pytest.approx(fraction * SPARSE_MARGIN * float(before[3]), rel=1e-3)
    torch.testing.assert_close(tightened.scene_box.aabb, torch.stack([after[:3] - after[3], after[:3] + after[3]]))


@needs_real
def test_colmap_sparse_points_tighten_the_region(cup, tmp_path, capsys) -> None:
    """A COLMAP model with points3D: the ball the cameras look at shrinks to the points it holds."""
    from nerfstudio.data.utils import colmap_parsing_utils as colmap_utils

    plain = CertSDFDataParserConfig(data=cup).setup().get_dataparser_outputs("train")
    data = tmp_path / "cup"
    shutil.copytree(cup, data)
    points = {i + 1: colmap_utils.Point3D(i + 1, xyz, np.array([128, 128, 128]), 0.5, np.array([1, 2]), np.array([0, 0]))
              for i, xyz in enumerate(_points_around_the_region(plain, 0.4))}  # fmt: skip
    colmap_utils.write_points3D_binary(points, data / "sparse" / "0" / "points3D.bin")
    capsys.readouterr()
    tightened = CertSDFDataParserConfig(data=data).setup().get_dataparser_outputs("train")
    assert len(tightened.metadata["points3D_xyz"]) == len(points)
    _assert_tightened(plain, tightened, 0.4)
    assert "tightened from radius" in " ".join(capsys.readouterr().out.split())


def test_sparse_ply_of_ns_process_data_tightens_the_region(fruit, tmp_path) -> None:
    """transforms.json naming a sparse point cloud (ns-process-data's ply_file_path) does the same."""
    plain = CertSDFDataParserConfig(data=fruit).setup().get_dataparser_outputs("train")
    data = tmp_path / "fruit"
    shutil.copytree(fruit, data)
    trimesh.PointCloud(_points_around_the_region(plain, 0.5)).export(data / "sparse_pc.ply")
    meta = json.loads((data / "transforms.json").read_text())
    (data / "transforms.json").write_text(json.dumps({**meta, "ply_file_path": "sparse_pc.ply"}))
    _assert_tightened(plain, CertSDFDataParserConfig(data=data).setup().get_dataparser_outputs("train"), 0.5)


def test_blender_layout_photographs_are_flagged_as_real_captures(tmp_path) -> None:
    """Blender layout, RGB images: on a plain background a synthetic object (not real); on a
    textured background a real capture, recorded in the metadata for a background model."""
    from certsdf_ns.data.scenes import make_scene

    scene = make_scene(tmp_path / "scene", image_size=24, n_train=6, n_val=1, n_test=1)
    rng = np.random.default_rng(0)
    for name, background in (("plain", lambda: np.full((24, 24, 3), 255, np.uint8)),
                             ("photo", lambda: rng.integers(0, 255, (24, 24, 3), dtype=np.uint8))):  # fmt: skip
        data = tmp_path / name
        shutil.copytree(scene, data)
        for png in data.glob("*/r_*.png"):
            rgba = Image.open(png).convert("RGBA")
            Image.alpha_composite(Image.fromarray(background()).convert("RGBA"), rgba).convert("RGB").save(png)
        outputs = CertSDFDataParserConfig(data=data).setup().get_dataparser_outputs("train")
        assert outputs.metadata[REAL_CAPTURE_KEY] is (name == "photo"), name
    rgba = CertSDFDataParserConfig(data=scene).setup().get_dataparser_outputs("train")
    assert rgba.metadata[REAL_CAPTURE_KEY] is False


# --------------------------------------------------------------------------- the real CLI
def _drop_keys(prefix: str, keep: int = 0) -> Callable[[Path], None]:
    def apply(data: Path) -> None:
        npz = dict(np.load(data / "cameras_sphere.npz"))
        for key in list(npz):
            if key.startswith(prefix) and int(key.rsplit("_", 1)[1]) >= keep:
                del npz[key]
        (data / "cameras_sphere.npz").unlink()
        np.savez(data / "cameras_sphere.npz", **npz)

    return apply


def _shrink(path: Path) -> None:
    Image.open(path).resize((40, 30)).save(path)


# (case, scene, how to break a copy, text the error must contain: the file and what is wrong)
BAD = [
    ("neus-no-world-mat", "dtu", lambda d: _drop_keys("world_mat_")(d), ["cameras_sphere.npz has no world_mat_i keys"]),
    ("neus-fewer-cameras", "dtu", _drop_keys("world_mat_", keep=40), ["cameras_sphere.npz has 40 cameras", "there are 49 images", "000040.png"]),  # fmt: skip
    ("neus-mask-count", "dtu", lambda d: (d / "mask" / "017.png").unlink(), ["/mask holds 48 masks", "/image holds 49 images"]),  # fmt: skip
    ("neus-mask-size", "dtu", lambda d: _shrink(d / "mask" / "005.png"), ["mask", "005.png is 40x30", "000005.png is 80x60"]),  # fmt: skip
    ("colmap-no-images-bin", "cup", lambda d: (d / "sparse" / "0" / "images.bin").unlink(), ["sparse/0/images.bin does not exist"]),  # fmt: skip
    ("colmap-bad-points3d", "cup", lambda d: (d / "sparse" / "0" / "points3D.bin").write_bytes(b"\xff" * 100), ["sparse/0/points3D.bin: the sparse points cannot be read", "They are optional"]),  # fmt: skip
    ("colmap-missing-image", "cup", lambda d: (d / "images" / "12.jpg").unlink(), ["sparse/0/images.bin, image", "('12.jpg')", "images/12.jpg does not exist"]),  # fmt: skip
]
GOOD = {"dtu": 5, "fruit": 2, "cup": 2}  # scene: training steps
# Every case of BAD is refused by the dataparser, which ns-train, ns-eval and ns-export all call: each
# is checked there, in-process; these two (a NeuS and a COLMAP one) also through ns-train.
BAD_THROUGH_THE_CLI = ("neus-fewer-cameras", "colmap-bad-points3d")


def _broken_copy(case: str, scenes: Dict[str, Path], root: Path) -> Path:
    (scene, breaker) = next((scene, breaker) for name, scene, breaker, _ in BAD if name == case)
    data = root / case
    shutil.copytree(scenes[scene], data)
    breaker(data)
    return data


@pytest.fixture(scope="module")
def cli_runs(dtu, fruit, cup, tmp_path_factory) -> Dict[str, Future]:
    """Every CLI run of this file, two at a time. The good runs print what a user sees: Python's
    default warning filters, not the suite's "ignore"."""
    scenes = {"dtu": dtu, "fruit": fruit, "cup": cup}
    root = tmp_path_factory.mktemp("cli")
    runs: Dict[str, Tuple[list, dict]] = {}
    for name, steps in GOOD.items():
        args = [ns("ns-train"), "certsdf", "--data", scenes[name], "--output-dir", root / "out", "--experiment-name", name,
                "--timestamp", "run", "--max-num-iterations", steps, *CLI_ARGS]  # fmt: skip
        if name == "dtu":  # the dataparser's options are plain flags (no dataparser subcommand)
            args += ["--pipeline.datamanager.dataparser.eval-every", "7"]
        runs[name] = (args, {"timeout": 600, "env_extra": {"PYTHONWARNINGS": None}})
    for case in BAD_THROUGH_THE_CLI:
        data = _broken_copy(case, scenes, root)
        args = [ns("ns-train"), "certsdf", "--data", data, "--output-dir", root / "bad", "--max-num-iterations", 1, *CLI_ARGS]  # fmt: skip
        runs[case] = (args, {"timeout": 600})
    started = start_cli_runs(runs)
    started["root"] = root  # type: ignore[assignment]
    return started


@needs_real
@pytest.mark.parametrize("case,scene,breaker,expected", BAD, ids=[b[0] for b in BAD])
def test_bad_real_input_is_refused(case, scene, breaker, expected, dtu, cup, tmp_path, capsys) -> None:
    """The dataparser exits with status 2 and one message naming the file and what is wrong."""
    data = _broken_copy(case, {"dtu": dtu, "cup": cup}, tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        CertSDFDataParserConfig(data=data).setup().get_dataparser_outputs("train")
    assert exit_info.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert err.startswith("certsdf error:") and str(data) in err, err[-2000:]
    for text in expected:
        assert text in err, (text, err[-2000:])


@needs_real
@pytest.mark.parametrize("case", BAD_THROUGH_THE_CLI)
def test_bad_real_input_is_refused_by_the_cli(case, cli_runs) -> None:
    proc = cli_runs[case].result()
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    err = " ".join(proc.stderr.split())
    assert "certsdf error:" in err and str(cli_runs["root"] / case) in err, err[-2000:]
    (expected,) = [expected for name, _, _, expected in BAD if name == case]
    for text in expected:
        assert text in err, (text, err[-2000:])


@needs_real
def test_dtu_trains_with_masks_and_exports_in_millimetres(cli_runs) -> None:
    """`ns-train certsdf --data <DTU in NeuS layout>`: no subcommand, 5 steps, a checkpoint, and the
    saved dataparser transform takes the unit sphere's centre to scale_mat's translation (mm)."""
    proc = cli_runs["dtu"].result()
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "neus format" in proc.stdout and "NeuS's unit sphere" in " ".join(proc.stdout.split())
    run_dir = cli_runs["root"] / "out" / "dtu" / "certsdf" / "run"
    assert "eval_every: 7" in (run_dir / "config.yml").read_text()
    assert list((run_dir / "nerfstudio_models").glob("step-*.ckpt"))
    transform, scale = read_frame(run_dir)
    origin = to_original_frame(trimesh.Trimesh([[0.0, 0, 0], [0.1, 0, 0], [0, 0.1, 0]], [[0, 1, 2]], process=False), transform, scale)
    np.testing.assert_allclose(origin.vertices[0], [-28.094833, -27.979301, 640.4341], atol=2e-3)
    np.testing.assert_allclose(np.linalg.norm(origin.vertices[1] - origin.vertices[0]), 0.1 * 164.60439, rtol=1e-5)


@needs_real
@pytest.mark.parametrize("scene", ["fruit", "cup", "dtu"])
def test_real_capture_runs_print_no_warnings_of_other_packages(scene, cli_runs) -> None:
    """With Python's default warning filters, a short `ns-train certsdf` on a real capture prints no
    warning of another package, nerfstudio's own deprecation warnings at import included (the package's
    start-up hook hides those before nerfstudio loads, see certsdf_ns/startup.py)."""
    proc = cli_runs[scene].result()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert warning_lines(proc.stdout + "\n" + proc.stderr) == []


@needs_real
@pytest.mark.parametrize("scene,fmt", [("fruit", "nerfstudio"), ("cup", "colmap")])
def test_phone_captures_get_past_dataparsing_and_train(scene, fmt, cli_runs) -> None:
    proc = cli_runs[scene].result()
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = " ".join(proc.stdout.split())
    assert f"{fmt} format" in out and "real capture" in out
    # The region comes from the cameras; outside it the background model (a grid without tinycudann).
    assert "region of interest" in out and "the ball the training cameras look at" in out, out[-2000:]
    run_dir = cli_runs["root"] / "out" / scene / "certsdf" / "run"
    assert list((run_dir / "nerfstudio_models").glob("step-*.ckpt"))
    assert "background_model: grid" in (run_dir / "config.yml").read_text()


@needs_real
def test_query_api_agrees_with_the_trained_model_on_a_real_capture(cli_runs) -> None:
    """`CertifiedSDF.from_checkpoint` gives the model's own certified SDF on a real capture: the region
    ball zeroes the occupancy outside it (box corners), σ is the schedule's at the checkpoint's step, and
    the original frame is the dataparser's transform undone."""
    from nerfstudio.utils.eval_utils import eval_setup

    from certsdf_ns.export.query import CertifiedSDF

    proc = cli_runs["fruit"].result()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    config = cli_runs["root"] / "out" / "fruit" / "certsdf" / "run" / "config.yml"
    _, pipeline, _, step = eval_setup(config, test_mode="inference")  # nerfstudio's own loading, as ns-eval does
    model = pipeline.model
    assert model.region is not None  # a real capture: the grid's box is the region ball's
    lo, hi = model.field.aabb
    corners = torch.stack(torch.meshgrid(*[torch.stack([lo[i], hi[i]]) for i in range(3)], indexing="ij"), -1).reshape(-1, 3)
    g = torch.Generator().manual_seed(0)
    x = torch.cat([corners, lo + (hi - lo) * torch.rand(2000, 3, generator=g)])
    expected = model.field.sdf_at(x).detach()

    sdf = CertifiedSDF.from_checkpoint(config, safety_margin=0.0, frame="nerfstudio")
    torch.testing.assert_close(sdf.distance(x), expected, atol=1e-5, rtol=0)
    assert sdf.sigma == pytest.approx(model.scheduled_smoothing(step)[0] * model.voxel)
    # Outside the ball nothing is the object: the corners lie at positive distance.
    assert bool((sdf.distance(corners) > 0).all())

    original = CertifiedSDF.from_checkpoint(config, safety_margin=0.0)
    transform, scale = read_frame(config.parent)
    full = np.vstack([transform, [0.0, 0.0, 0.0, 1.0]])
    x_original = torch.from_numpy((np.linalg.inv(full) @ np.c_[x.numpy() / scale, np.ones(len(x))].T).T[:, :3]).float()
    torch.testing.assert_close(original.distance(x_original), expected / scale, atol=1e-5 / scale, rtol=1e-4)
