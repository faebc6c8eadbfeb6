"""Degenerate cameras and masks, tried as a new user would (issue 31): through the real `ns-train certsdf`
CLI, exit status 2 with one message naming the file and the camera, and no traceback.

One tiny generated scene (16 px, 10 views) is written in all four formats (Blender, transforms.json,
NeuS/IDR, COLMAP); each case breaks a copy. Every case goes through the dataparser that ns-train calls
(SystemExit 2, the paragraph on stderr); one case per format, and the masks, through the `ns-train` CLI
itself, two processes at a time from one module fixture (each spends ~10 s of CPU importing). Masks
without a boundary are not refused: the set is dropped with a warning and training goes on. The checks
also pass on the shared real captures.
"""

from __future__ import annotations

import json
import math
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Dict

import numpy as np
import pytest
from PIL import Image

from conftest import SHARED, ns, run_cli

from certsdf_ns.data.dataparser import CertSDFDataParserConfig
from certsdf_ns.data.neus import opencv_to_opengl

VIEWS = 10
SIZE = 16
# One step of a tiny model, no viewer (only the mask cases get as far as training).
CLI_ARGS = [
    "--vis", "tensorboard", "--viewer.quit-on-train-completion", "True", "--max-num-iterations", "1",
    "--pipeline.model.grid-resolution", "16", "--pipeline.model.hash-log2-size", "12",
    "--pipeline.model.hash-levels", "2", "--pipeline.model.hash-max-res", "32",
    "--pipeline.datamanager.train-num-rays-per-batch", "64",
]  # fmt: skip
REAL = SHARED / "real"


# --------------------------------------------------------------------------- one scene, four formats
def _photo(rgba: Image.Image) -> Image.Image:
    """The rendered object on a grey background, as an RGB photograph."""
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (128, 128, 128, 255)), rgba).convert("RGB")


def _mask(rgba: Image.Image) -> Image.Image:
    """White where the object is (alpha > 0), black elsewhere."""
    return rgba.getchannel("A").point(lambda a: 255 if a > 0 else 0)


def write_formats(root: Path) -> Dict[str, Path]:
    """The train split of a generated Blender scene as Blender, transforms.json, NeuS/IDR (with masks) and
    COLMAP (text model) scenes; the same cameras in each."""
    from nerfstudio.data.utils import colmap_parsing_utils as colmap_utils

    from certsdf_ns.data.scenes import make_scene

    blender = make_scene(root / "blender", image_size=SIZE, n_train=VIEWS, n_val=1, n_test=1)
    meta = json.loads((blender / "transforms_train.json").read_text())
    focal = 0.5 * SIZE / math.tan(0.5 * meta["camera_angle_x"])
    pictures = [Image.open(blender / f"{f['file_path']}.png").convert("RGBA") for f in meta["frames"]]
    c2w_gl = [np.array(f["transform_matrix"], dtype=np.float64) for f in meta["frames"]]
    w2c_cv = [np.linalg.inv(opencv_to_opengl(c2w)) for c2w in c2w_gl]

    nerfstudio = root / "nerfstudio"
    (nerfstudio / "images").mkdir(parents=True)
    frames = []
    for i, (rgba, c2w) in enumerate(zip(pictures, c2w_gl)):
        rgba.save(nerfstudio / "images" / f"r_{i}.png")
        frames.append({"file_path": f"images/r_{i}.png", "transform_matrix": c2w.tolist()})
    (nerfstudio / "transforms.json").write_text(
        json.dumps({"fl_x": focal, "fl_y": focal, "cx": SIZE / 2, "cy": SIZE / 2, "w": SIZE, "h": SIZE, "frames": frames})
    )

    neus = root / "neus"
    (neus / "image").mkdir(parents=True)
    (neus / "mask").mkdir()
    K = np.array([[focal, 0.0, SIZE / 2 - 0.5], [0.0, focal, SIZE / 2 - 0.5], [0.0, 0.0, 1.0]])  # OpenCV pixel centres
    arrays = {}
    for i, (rgba, w2c) in enumerate(zip(pictures, w2c_cv)):
        _photo(rgba).save(neus / "image" / f"{i:06d}.png")
        _mask(rgba).save(neus / "mask" / f"{i:03d}.png")
        world = np.eye(4)
        world[:3, :4] = K @ w2c[:3]
        arrays[f"world_mat_{i}"], arrays[f"scale_mat_{i}"] = world, np.eye(4)
    np.savez(neus / "cameras_sphere.npz", **arrays)

    colmap = root / "colmap"
    (colmap / "images").mkdir(parents=True)
    (colmap / "sparse" / "0").mkdir(parents=True)
    camera = colmap_utils.Camera(id=1, model="PINHOLE", width=SIZE, height=SIZE, params=np.array([focal, focal, SIZE / 2, SIZE / 2]))
    images = {}
    for i, (rgba, w2c) in enumerate(zip(pictures, w2c_cv)):
        _photo(rgba).save(colmap / "images" / f"r_{i}.png")
        images[i + 1] = colmap_utils.Image(
            id=i + 1, qvec=colmap_utils.rotmat2qvec(w2c[:3, :3]), tvec=w2c[:3, 3], camera_id=1, name=f"r_{i}.png",
            xys=np.zeros((0, 2)), point3D_ids=np.zeros(0, dtype=int),
        )  # fmt: skip
    colmap_utils.write_cameras_text({1: camera}, colmap / "sparse" / "0" / "cameras.txt")
    colmap_utils.write_images_text(images, colmap / "sparse" / "0" / "images.txt")
    return {"blender": blender, "nerfstudio": nerfstudio, "neus": neus, "colmap": colmap}


# --------------------------------------------------------------------------- how to break them
def _edit_json(path: Path, edit: Callable[[dict], None]) -> None:
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))  # json writes NaN for float("nan"), as some exporters do


def _same_pose(meta: dict) -> None:
    for frame in meta["frames"]:
        frame["transform_matrix"] = meta["frames"][0]["transform_matrix"]


def _identity_poses(meta: dict) -> None:
    for frame in meta["frames"]:
        frame["transform_matrix"] = np.eye(4).tolist()


def _edit_npz(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(data: Path) -> None:
        arrays = dict(np.load(data / "cameras_sphere.npz"))
        edit(arrays)
        np.savez(data / "cameras_sphere.npz", **arrays)

    return apply


def _set(key: str, value) -> Callable[[dict], None]:
    def edit(arrays: dict) -> None:
        arrays[key] = value(arrays[key].copy())

    return edit


def _nan_at(matrix: np.ndarray) -> np.ndarray:
    matrix[1, 2] = np.nan
    return matrix


def _colmap_model(data: Path):
    from nerfstudio.data.utils import colmap_parsing_utils as colmap_utils

    model = data / "sparse" / "0"
    return colmap_utils, model, colmap_utils.read_cameras_text(model / "cameras.txt"), colmap_utils.read_images_text(model / "images.txt")


def _colmap_focal(value: float, binary: bool) -> Callable[[Path], None]:
    def apply(data: Path) -> None:
        colmap_utils, model, cameras, images = _colmap_model(data)
        cameras = {cid: cam._replace(params=np.array([value, *cam.params[1:]])) for cid, cam in cameras.items()}
        if binary:  # the same model as cameras.bin / images.bin
            colmap_utils.write_cameras_binary(cameras, model / "cameras.bin")
            colmap_utils.write_images_binary(images, model / "images.bin")
            (model / "cameras.txt").unlink()
            (model / "images.txt").unlink()
        else:
            colmap_utils.write_cameras_text(cameras, model / "cameras.txt")

    return apply


def _colmap_poses(pose: Callable[[int, object], object]) -> Callable[[Path], None]:
    def apply(data: Path) -> None:
        colmap_utils, model, _, images = _colmap_model(data)
        colmap_utils.write_images_text({i: pose(i, image) for i, image in images.items()}, model / "images.txt")

    return apply


def _slider(i: int, image):
    """Image i's camera on a line along x, every camera facing +y (the same way): OpenCV axes x, −z, y in the world."""
    from nerfstudio.data.utils import colmap_parsing_utils as colmap_utils

    rotation = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]]).T  # world-to-camera
    centre = np.array([-2.0 + 4.0 * (i - 1) / (VIEWS - 1), -4.0, 0.5])
    return image._replace(qvec=colmap_utils.rotmat2qvec(rotation), tvec=-rotation @ centre)


def _masks(format: str, value: int) -> Callable[[Path], None]:
    """Replace every mask with one grey level (nerfstudio: add mask_path masks, its sampling masks)."""

    def apply(data: Path) -> None:
        if format == "neus":
            for path in (data / "mask").iterdir():
                Image.new("L", (SIZE, SIZE), value).save(path)
            return
        (data / "masks").mkdir()
        meta = json.loads((data / "transforms.json").read_text())
        for i, frame in enumerate(meta["frames"]):
            Image.new("L", (SIZE, SIZE), value).save(data / "masks" / f"m_{i}.png")
            frame["mask_path"] = f"masks/m_{i}.png"
        (data / "transforms.json").write_text(json.dumps(meta))

    return apply


# (case, format, how to break a copy, texts the one error paragraph must contain: the file and the camera)
REFUSED = [
    ("blender-same-pose", "blender", lambda d: _edit_json(d / "transforms_train.json", _same_pose),
     ["transforms_train.json: all 10 cameras stand at the same point", "frame 0 (file_path './train/r_0')", "no parallax"]),
    ("nerfstudio-identity-poses", "nerfstudio", lambda d: _edit_json(d / "transforms.json", _identity_poses),
     ["transforms.json: all 10 cameras stand at the same point (0, 0, 0)", "frame 0 (file_path 'images/r_0.png')"]),
    ("nerfstudio-focal-zero", "nerfstudio", lambda d: _edit_json(d / "transforms.json", lambda m: m.update(fl_x=0)),
     ["transforms.json: 'fl_x' is 0; it must be a positive focal length in pixels"]),
    ("nerfstudio-frame-focal-nan", "nerfstudio", lambda d: _edit_json(d / "transforms.json", lambda m: m["frames"][3].update(fl_y=float("nan"))),
     ["transforms.json, frame 3: 'fl_y' is nan; it must be a positive focal length"]),
    ("neus-zero-world-mat", "neus", _edit_npz(_set("world_mat_4", np.zeros_like)),
     ["cameras_sphere.npz: world_mat_4 (camera of 000004.png) is singular", "has rank 0"]),
    ("neus-nan-world-mat", "neus", _edit_npz(_set("world_mat_5", _nan_at)),
     ["cameras_sphere.npz: world_mat_5 (camera of 000005.png) contains NaN"]),
    ("neus-same-centre", "neus", _edit_npz(lambda a: a.update({f"world_mat_{i}": a["world_mat_0"] for i in range(VIEWS)})),
     ["cameras_sphere.npz: all 10 cameras stand at the same point", "world_mat_0 (camera of 000000.png)"]),
    ("colmap-focal-zero-txt", "colmap", _colmap_focal(0.0, binary=False),
     ["sparse/0/cameras.txt, camera 1: 'fl_x' is 0.0; it must be a positive focal length"]),
    ("colmap-focal-nan-bin", "colmap", _colmap_focal(float("nan"), binary=True),
     ["sparse/0/cameras.bin, camera 1: 'fl_x' is nan"]),
    ("colmap-same-centre", "colmap", _colmap_poses(lambda i, image: image._replace(qvec=image.qvec, tvec=np.zeros(3))),
     ["sparse/0/images.txt: all 10 cameras stand at the same point", "image 1 ('r_0.png')"]),
    ("colmap-nan-pose", "colmap", _colmap_poses(lambda i, image: image._replace(qvec=np.full(4, np.nan)) if i == 3 else image),
     ["sparse/0/images.txt, image 3 ('r_2.png')", "its pose (qvec, tvec) contains NaN"]),
    ("colmap-slider", "colmap", _colmap_poses(_slider),
     ["do not look at a common point", "in the images of 0 of the", "(not in r_", "--pipeline.datamanager.dataparser.region"]),
]  # fmt: skip
CLI_CASES = ["blender-same-pose", "nerfstudio-frame-focal-nan", "neus-zero-world-mat", "colmap-slider"]
"""One refusal per format through the real `ns-train` (the slider also reaches the region and the line warning)."""
# Masks without a boundary: trained on without them, with a warning naming the file and what the masks are.
DROPPED_MASKS = [
    ("neus-masks-all-white", "neus", _masks("neus", 255), ["cameras_sphere.npz: none of the 10 masks", "10 all white"]),
    ("nerfstudio-masks-all-black", "nerfstudio", _masks("nerfstudio", 0), ["transforms.json: none of the 10 masks", "10 all black"]),
]


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Dict[str, Path]:
    return write_formats(tmp_path_factory.mktemp("degenerate") / "scenes")


@pytest.fixture(scope="module")
def cli_runs(scenes, tmp_path_factory) -> Dict[str, Future]:
    """Every CLI run of this file, two at a time (each ns-train spends ~8 s of CPU importing)."""
    root = tmp_path_factory.mktemp("degenerate_cli")
    pool = ThreadPoolExecutor(max_workers=2)
    runs: Dict[str, Future] = {}
    for case, fmt, breaker, _ in [c for c in REFUSED if c[0] in CLI_CASES] + DROPPED_MASKS:
        data = root / case
        shutil.copytree(scenes[fmt], data)
        breaker(data)
        args = [ns("ns-train"), "certsdf", "--data", data, "--output-dir", root / "out", "--experiment-name", case, *CLI_ARGS]
        runs[case] = pool.submit(run_cli, args, 600)
    pool.shutdown(wait=False)
    runs["root"] = root  # type: ignore[assignment]
    return runs


def test_intact_scenes_are_accepted(scenes, capsys) -> None:
    """The four unbroken scenes pass every check (so each refusal below comes from its breakage): no
    warning about the cameras, NeuS's masks kept as object masks."""
    for fmt, data in scenes.items():
        parser = CertSDFDataParserConfig(data=data).setup()
        outputs = parser.get_dataparser_outputs("train")
        assert parser.format == fmt and len(outputs.image_filenames) >= 8, fmt
        assert (outputs.mask_filenames is not None) is (fmt == "neus"), fmt
    out = " ".join(capsys.readouterr().out.split())
    assert "warning:" not in out and "boundary" not in out, out


@pytest.mark.parametrize("case,fmt,breaker,expected", REFUSED, ids=[c[0] for c in REFUSED])
def test_degenerate_cameras_are_refused_by_the_dataparser(case, fmt, breaker, expected, scenes, tmp_path, capsys) -> None:
    """What ns-train/ns-eval call: exit status 2, one paragraph naming the file and the camera."""
    data = tmp_path / case
    shutil.copytree(scenes[fmt], data)
    breaker(data)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        CertSDFDataParserConfig(data=data).setup().get_dataparser_outputs("train")
    assert exit_info.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert err.startswith("certsdf error:") and err.count("certsdf error:") == 1 and str(data) in err, err
    for text in expected:
        assert text in err, (text, err)


@pytest.mark.parametrize("case", CLI_CASES)
def test_degenerate_cameras_are_refused_by_the_cli(case, cli_runs) -> None:
    expected = next(c[3] for c in REFUSED if c[0] == case)
    proc = cli_runs[case].result()
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    err = " ".join(proc.stderr.split())
    assert err.count("certsdf error:") == 1 and str(cli_runs["root"] / case) in err, err[-2000:]
    for text in expected:
        assert text in err, (text, err[-2000:])
    assert not list((cli_runs["root"] / "out" / case).rglob("*.ckpt"))  # refused before training


def test_cameras_on_one_line_are_named_in_a_warning(cli_runs) -> None:
    """The slider's centres lie on one line: a warning (not a refusal on its own) names the two end cameras."""
    out = " ".join(cli_runs["colmap-slider"].result().stdout.split())
    assert "images.txt: all 10 camera centres lie on one line, from image 1 ('r_0.png') to image 10 ('r_9.png')" in out, out[-2000:]


@pytest.mark.parametrize("case,fmt,breaker,expected", DROPPED_MASKS, ids=[c[0] for c in DROPPED_MASKS])
def test_masks_without_a_boundary_are_dropped_with_a_warning(case, fmt, breaker, expected, cli_runs) -> None:
    """Every mask all white (NeuS object masks: every view's frustum would be filled) or all black
    (nerfstudio sampling masks: no ray could be drawn): one warning, then training without masks."""
    proc = cli_runs[case].result()
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = " ".join(proc.stdout.split())
    assert out.count("none of the 10 masks has a boundary") == 1, out[-3000:]
    for text in expected + ["training goes on without masks", "--pipeline.datamanager.dataparser.use-masks False"]:
        assert text in out, (text, out[-3000:])
    assert list((cli_runs["root"] / "out" / case).rglob("*.ckpt"))


def test_a_blank_mask_among_good_ones_is_kept(scenes, tmp_path, capsys) -> None:
    """One all-black mask (the object out of view) among masks with a boundary: the masks stay, counted in
    one line; and the same scene with every mask blank drops them (mixed black and white alike)."""
    data = tmp_path / "neus"
    shutil.copytree(scenes["neus"], data)
    Image.new("L", (SIZE, SIZE), 0).save(data / "mask" / "003.png")
    outputs = CertSDFDataParserConfig(data=data).setup().get_dataparser_outputs("train")
    assert outputs.mask_filenames is not None and outputs.metadata["certsdf_foreground_masks"] is True
    out = " ".join(capsys.readouterr().out.split())
    assert "1 of 10 masks have no boundary (1 all black (e.g." in out and "003.png" in out and "kept" in out, out
    for i in range(VIEWS):
        Image.new("L", (SIZE, SIZE), 255 * (i % 2)).save(data / "mask" / f"{i:03d}.png")
    outputs = CertSDFDataParserConfig(data=data).setup().get_dataparser_outputs("train")
    assert outputs.mask_filenames is None and "certsdf_foreground_masks" not in outputs.metadata
    assert "5 all black" in " ".join(capsys.readouterr().out.split())


def test_tolerances_are_scale_free(scenes, tmp_path, capsys) -> None:
    """A rank-2 projection is refused at any scale while a real one scaled by 1e-3 passes; centres 1e-3
    off a line are not on one line; cameras 1e-4 of their distance from the origin apart have moved, 1e-7
    apart have not."""
    from certsdf_ns.data.neus import NeuSLayout, load_matrices
    from certsdf_ns.data.validation import check_camera_centres
    from certsdf_ns.errors import CertSDFInputError

    world = np.load(scenes["neus"] / "cameras_sphere.npz")["world_mat_0"]
    rank2 = world.copy()
    rank2[2, :3] = rank2[0, :3] + 2.0 * rank2[1, :3]
    for matrix, refused in ((1e-3 * world, False), (1e3 * rank2, True), (1e-3 * rank2, True)):
        np.savez(tmp_path / "cameras_sphere.npz", world_mat_0=matrix)
        layout = NeuSLayout(cameras=tmp_path / "cameras_sphere.npz", images=[tmp_path / "000000.png"], masks=None)
        if refused:
            with pytest.raises(CertSDFInputError, match=r"world_mat_0 \(camera of 000000.png\) is singular: .* has rank 2"):
                load_matrices(layout)
        else:
            load_matrices(layout)

    names = [f"camera {i}" for i in range(4)]
    line = np.array([[0.0, 0, 0], [1, 0, 0], [2, 0, 0], [3, 0, 0]]) + 500.0
    capsys.readouterr()
    check_camera_centres(line + np.array([[0, 0, 0], [0, 3e-3, 0], [0, 0, 3e-3], [0, 0, 0]]), Path("f"), names)
    assert "one line" not in capsys.readouterr().out
    check_camera_centres(line, Path("f"), names)
    assert "f: all 4 camera centres lie on one line, from camera 0 to camera 3" in " ".join(capsys.readouterr().out.split())
    check_camera_centres(np.full((4, 3), 500.0) + 1e-4 * 500 * np.eye(4, 3), Path("f"), names)
    with pytest.raises(CertSDFInputError, match="all 4 cameras stand at the same point"):
        check_camera_centres(np.full((4, 3), 500.0) + 1e-7 * 500 * np.eye(4, 3), Path("f"), names)
    with pytest.raises(CertSDFInputError, match="all 4 cameras stand at the same point"):
        check_camera_centres(np.zeros((4, 3)), Path("f"), names)
    check_camera_centres(np.zeros((1, 3)), Path("f"), names)  # a single camera (a val split) is not judged


# --------------------------------------------------------------------------- no false positives on real data
def test_checks_pass_on_the_shared_captures(capsys) -> None:
    """DTU scan65 (NeuS, masks), fruit (transforms.json), cup (COLMAP) and lego (Blender): every camera
    check passes, no camera warning, DTU's masks are kept, and the real captures' cameras look at their region."""
    if not REAL.is_dir() or not (SHARED / "nerf_synthetic" / "lego").is_dir():
        pytest.skip(f"{REAL} or {SHARED / 'nerf_synthetic' / 'lego'} is absent: the shared captures are not mounted")
    from certsdf_ns.data.neus import validate_neus
    from certsdf_ns.data.validation import validate_blender_split

    report = validate_neus(REAL / "dtu_scan65")
    assert len(report.masks) == 49 and not report.blank_masks
    assert len(validate_blender_split(SHARED / "nerf_synthetic" / "lego", "train").image_files) == 100
    for name, fmt in (("fruit", "nerfstudio"), ("cup_colmap", "colmap"), ("dtu_scan65", "neus")):
        parser = CertSDFDataParserConfig(data=REAL / name).setup()
        outputs = parser.get_dataparser_outputs("train")
        assert parser.format == fmt and (outputs.mask_filenames is not None) is (fmt == "neus"), name
    out = " ".join(capsys.readouterr().out.split())
    assert "one line" not in out and "boundary" not in out, out
    assert out.count("the ball the training cameras look at") == 2, out
