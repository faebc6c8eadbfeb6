"""Checks on a scene folder before training.

nerfstudio's parsers assume well-formed data: a missing image or a typo in transforms.json
surfaces as a KeyError or a PIL traceback several layers deep, sometimes after minutes of
loading. Here every frame is checked up front and the first problem is reported as one
paragraph naming the file and the frame.

Errors are raised as :class:`certsdf_ns.errors.CertSDFInputError`.
"""

from __future__ import annotations

import json
import math
from struct import error as struct_error
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from jaxtyping import Float
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from certsdf_ns.console import log, warn
from certsdf_ns.errors import CertSDFInputError

# |RᵀR − I| allowed in a camera rotation. JSON files written with 6+ significant digits
# (NeRF-synthetic, ns-process-data) are orthonormal to ~1e-6; 1e-3 still accepts poses
# printed with 4 digits but rejects a 0.1% scale or any visible shear.
ROTATION_TOLERANCE = 1e-3
# A background is "uniform" when this fraction of border pixels lies within
# BACKGROUND_SPREAD of the median border colour.
BACKGROUND_UNIFORM_FRACTION = 0.9
BACKGROUND_SPREAD = 0.1
BACKGROUND_SAMPLE_IMAGES = 8
NERFSTUDIO_INTRINSICS = ("fl_x", "fl_y", "cx", "cy", "w", "h")
DISTORTION_KEYS = ("k1", "k2", "k3", "k4", "p1", "p2")
READABLE_IMAGE_MODES = ("RGB", "RGBA", "L")
"""PIL modes nerfstudio's InputDataset reads correctly: 8-bit RGB(A) (16-bit PNGs open as these, scaled
to 8 bits by PIL) and 8-bit grey (repeated to RGB). Every other mode is refused (see IMAGE_MODE_PROBLEMS)."""
IMAGE_MODE_PROBLEMS = {
    "1": "1-bit black and white would be read as values 0/1, i.e. black",
    "P": "palette indices would be read as grey levels instead of colours",
    "PA": "palette indices would be read as grey levels, and its alpha cannot be read",
    "LA": "grey with alpha has 2 channels, which nerfstudio cannot read",
    "La": "grey with premultiplied alpha has 2 channels, which nerfstudio cannot read",
    "I": "32-bit integer pixels would be wrapped to 8 bits",
    "F": "floating-point pixels would be truncated to 8 bits",
    "CMYK": "its 4 CMYK channels would be read as RGBA",
    "YCbCr": "its YCbCr channels would be read as RGB",
    "LAB": "its Lab channels would be read as RGB",
    "HSV": "its HSV channels would be read as RGB",
    "RGBX": "its padding channel would be read as alpha",
    "RGBa": "its premultiplied alpha would be read as straight alpha",
}
SAME_POINT_TOLERANCE = 1e-6
"""Camera centres whose largest distance from their mean is at most this fraction of the farthest centre's
distance from the origin sit at one point (copies of one pose, placeholder poses, a rotation-only panorama).
Scale-free; 1e-6 is above the rounding of float32 poses (6e-8) and of JSON printed with 7 digits."""
COLLINEAR_TOLERANCE = 1e-4
"""Camera centres whose second principal spread is at most this fraction of the first lie on one line
(real structure-from-motion poses, even from a slider, deviate from any line by more than 1e-3)."""
SAMPLING_MASK_LEVEL = 0
"""A pixel of a sampling mask is set above this grey level (nerfstudio reads every non-zero pixel as set)."""
OBJECT_MASK_LEVEL = 127
"""A pixel of an object mask is set above this grey level (certsdf reads grey/255 as the object's opacity)."""
BACKGROUND_KEY = "certsdf_background"
"""Dataparser metadata key: fixed background colour [3] for images without alpha."""
REAL_CAPTURE_KEY = "certsdf_real_capture"
"""Dataparser metadata key: True for photographs of a real scene (no alpha, a background that is not
one plain colour; every NeuS/IDR and COLMAP scene). A background model can switch on from it."""
FOREGROUND_MASKS_KEY = "certsdf_foreground_masks"
"""Dataparser metadata key: True when `mask_filenames` are object masks (white = object) that supervise
the foreground's accumulation, to be delivered as `MASK_BATCH_KEY` with rays sampled everywhere,
rather than nerfstudio's sampling masks (rays only where the mask is set)."""
REGION_KEY = "certsdf_region"
"""Dataparser metadata key: the object's region of interest, [cx, cy, cz, r] (a ball, dataparser frame).
Present on real captures (and when the user sets one); the model confines the certified grid to it and
hands everything outside to its background model."""
MASK_BATCH_KEY = "certsdf_mask"
"""Batch key of the object mask in [0, 1] (per ray in training, [H, W, 1] in evaluation)."""


@dataclass
class SplitReport:
    """What the checks learnt about one split."""

    transforms: Path
    """The camera file that was checked (transforms JSON, cameras_sphere.npz or COLMAP images.bin)."""
    image_files: List[Path]
    """Image of every frame, in file order."""
    has_alpha: bool
    """Whether the images carry an alpha channel (every frame alike)."""
    masks: List[Path] = field(default_factory=list)
    """The scene's masks, in frame order (empty when it has none)."""
    blank_masks: Dict[str, List[Path]] = field(default_factory=dict)
    """Masks without a boundary, by kind: "all black" (no pixel set) and "all white" (every pixel set)."""

    def add_mask(self, mask: Path, blank: Optional[str]) -> None:
        """Record one checked mask and what :func:`check_mask` found blank about it."""
        self.masks.append(mask)
        if blank is not None:
            self.blank_masks.setdefault(blank, []).append(mask)


def load_transforms(path: Path) -> Dict[str, Any]:
    """Parse a transforms JSON, naming the file and position of a syntax error."""
    if not path.is_file():
        raise CertSDFInputError(f"{path} does not exist.")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CertSDFInputError(f"{path} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}.") from err
    except UnicodeDecodeError as err:
        raise CertSDFInputError(f"{path} is not a UTF-8 text file ({err.reason}).") from err
    except OSError as err:
        raise CertSDFInputError(f"{path} cannot be read ({err.strerror or err}).") from err
    if not isinstance(meta, dict):
        raise CertSDFInputError(f"{path} must hold a JSON object with a 'frames' list, not a {type(meta).__name__}.")
    frames = meta.get("frames")
    if not isinstance(frames, list) or not frames:
        raise CertSDFInputError(f"{path} has no 'frames' list (or it is empty): nothing to train on.")
    return meta


def check_pose(matrix: Any, where: str, what: str = "transform_matrix") -> Float[Tensor, "4 4"]:
    """A camera pose (`what`: its name in the file) must be 4×4, finite, with an orthonormal right-handed rotation."""
    try:
        pose = np.asarray(matrix, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise CertSDFInputError(f"{where}: {what} is not a numeric matrix ({err}).") from err
    if pose.shape != (4, 4):
        raise CertSDFInputError(f"{where}: {what} must be 4x4, got shape {pose.shape}.")
    if not np.isfinite(pose).all():
        raise CertSDFInputError(f"{where}: {what} contains NaN or infinite values.")
    rot = pose[:3, :3]
    error = float(np.abs(rot.T @ rot - np.eye(3)).max())
    if error > ROTATION_TOLERANCE or np.linalg.det(rot) <= 0:
        raise CertSDFInputError(
            f"{where}: the rotation part of {what} is not a rotation (max |RᵀR − I| = {error:.2g}, "
            f"det = {np.linalg.det(rot):.3g}; tolerance {ROTATION_TOLERANCE:g}, det must be +1). Scale or shear in a "
            "camera pose distorts every ray; store the scale in the translation or the scene, not the rotation."
        )
    return torch.from_numpy(pose)


def check_image(path: Path, where: str) -> Tuple[Tuple[int, int], bool]:
    """(width, height) and whether an image has alpha; fails if it is missing or undecodable."""
    if not path.is_file():
        raise CertSDFInputError(f"{where}: image {path} does not exist.")
    try:
        with Image.open(path) as im:
            size, mode, info = im.size, im.mode, dict(im.info)
            im.verify()  # checks the whole file (e.g. PNG CRCs) without decoding the pixels
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise CertSDFInputError(f"{where}: image {path} cannot be read ({err}).") from err
    check_image_mode(path, where, mode, info)
    return size, mode == "RGBA"


def check_image_mode(path: Path, where: str, mode: str, info: Dict[str, Any]) -> None:
    """Refuse every PIL mode nerfstudio would read wrongly (it casts the pixels to uint8 and
    takes 3 channels as RGB, 4 as RGBA, 1 as grey) or not at all."""
    convert = "Convert it to 8-bit RGB or RGBA, e.g. PIL.Image.open(p).convert('RGBA').save(p)."
    if mode not in READABLE_IMAGE_MODES:
        if mode.startswith("I;16"):
            why = "16-bit grey pixels would be wrapped to 8 bits"
        else:
            why = IMAGE_MODE_PROBLEMS.get(mode, "nerfstudio reads only RGB, RGBA and 8-bit grey images")
        raise CertSDFInputError(f"{where}: image {path} has PIL mode '{mode}': {why}. {convert}")
    if "transparency" in info:
        raise CertSDFInputError(
            f"{where}: image {path} ({mode}) marks transparency with a colour key, which nerfstudio ignores "
            f"(the image would be read without alpha). {convert}"
        )


def _check_frames(
    transforms: Path, frames: List[Any], image_path, expected_size=None, check_centres: bool = True
) -> SplitReport:
    """Shared per-frame checks: every pose (and, with `check_centres`, where the cameras stand, see
    :func:`check_camera_centres`) before any image is opened; then image presence/readability, one size
    and one alpha mode."""
    names, centres = [], []
    for i, frame in enumerate(frames):
        where = f"{transforms}, frame {i}"
        if not isinstance(frame, dict) or not isinstance(frame.get("file_path"), str):
            raise CertSDFInputError(f"{where}: each frame needs a 'file_path' string.")
        names.append(f"frame {i} (file_path '{frame['file_path']}')")
        if "transform_matrix" not in frame:
            raise CertSDFInputError(f"{transforms}, {names[-1]}: 'transform_matrix' is missing.")
        centres.append(check_pose(frame["transform_matrix"], f"{transforms}, {names[-1]}")[:3, 3].numpy())
    if check_centres:
        check_camera_centres(np.stack(centres), transforms, names)
    files: List[Path] = []
    first: Optional[Tuple[str, Tuple[int, int], bool]] = None
    for i, frame in enumerate(frames):
        where = f"{transforms}, {names[i]}"
        path = image_path(frame)
        # A common slip: Blender-format file_path values omit the extension.
        hint = " Blender-format file_path values omit '.png' (it is appended)." if path.name.endswith(".png.png") else ""
        try:
            size, alpha = check_image(path, where)
        except CertSDFInputError as err:
            raise CertSDFInputError(f"{err}{hint}") from err
        want = expected_size(frame) if expected_size is not None else None
        if want is not None and tuple(want) != size:
            raise CertSDFInputError(
                f"{where}: image {path} is {size[0]}x{size[1]} but the transforms declare w={want[0]}, h={want[1]}."
            )
        if first is None:
            first = (str(path), size, alpha)
        elif expected_size is None and size != first[1]:
            raise CertSDFInputError(
                f"{where}: image {path} is {size[0]}x{size[1]} but {first[0]} is {first[1][0]}x{first[1][1]}; "
                "all images of a split must have the same size (the cameras share one set of intrinsics)."
            )
        if alpha != first[2]:
            raise CertSDFInputError(
                f"{where}: image {path} {'has' if alpha else 'has no'} alpha channel but {first[0]} "
                f"{'has' if first[2] else 'has none'}; use all RGBA or all RGB images."
            )
        files.append(path)
    assert first is not None
    return SplitReport(transforms=transforms, image_files=files, has_alpha=first[2])


def check_camera_centres(centres: Float[np.ndarray, "N 3"], source: Path, names: Sequence[str]) -> None:
    """Where the cameras stand, before nerfstudio centres and scales the poses by their spread.

    All at one point (SAME_POINT_TOLERANCE) is refused: without parallax there is no depth to
    reconstruct, and nerfstudio's auto-scale divides by zero. On one line (COLLINEAR_TOLERANCE) is
    accepted with a warning: cameras on a rail that face the object see it in 3D, from one fan of
    directions; a rail whose cameras all face the same way has no point they look at, which the region
    of a real capture then refuses (:func:`certsdf_ns.data.region.check_cameras_see`).
    """
    c = np.asarray(centres, dtype=np.float64)
    if len(c) < 2:
        return
    offsets = c - c.mean(axis=0)
    distance = np.linalg.norm(offsets, axis=1)
    if distance.max() <= SAME_POINT_TOLERANCE * np.linalg.norm(c, axis=1).max():
        at = ", ".join(f"{v:.4g}" for v in c[0])
        raise CertSDFInputError(
            f"{source}: all {len(c)} cameras stand at the same point ({at}), {names[0]} to {names[-1]}: their poses "
            "differ at most in rotation, so there is no parallax to see depth from. A reconstruction needs photographs "
            "taken from different positions around the object; if the poses are placeholders (e.g. every pose the "
            "identity), compute real ones (ns-process-data, COLMAP)."
        )
    _, spread, axes = np.linalg.svd(offsets, full_matrices=False)
    if spread[1] <= COLLINEAR_TOLERANCE * spread[0]:
        along = offsets @ axes[0]
        start, end = int(along.argmin()), int(along.argmax())
        warn(
            f"{source}: all {len(c)} camera centres lie on one line, from {names[start]} to {names[end]}. Cameras on "
            "a rail that face the object see it from one fan of directions only: the sides facing away from the "
            "line are not seen. If these poses are placeholders, compute real ones (ns-process-data, COLMAP)."
        )


def is_number(value: Any) -> bool:
    """A JSON number (bool is an int in Python, but `true` is no focal length)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_number(value: Any, where: str, key: str, rule: str, ok) -> None:
    """One numeric camera field: a finite JSON number for which ok(value) holds."""
    if not is_number(value) or not math.isfinite(value) or not ok(value):
        raise CertSDFInputError(f"{where}: '{key}' is {value!r}; it must be {rule}.")


def check_camera_fields(entry: Dict[str, Any], where: str, defaults: Optional[Dict[str, Any]] = None) -> None:
    """Type, finiteness and range of every numeric camera field nerfstudio's parser reads from a
    transforms.json object (top level, or a frame with `defaults` = the top level)."""
    scope = {**(defaults or {}), **entry}
    for key in ("w", "h"):
        if key in entry:
            _check_number(entry[key], where, key, "a positive whole number of pixels", lambda v: v >= 1 and v == int(v))
    for key in ("fl_x", "fl_y"):
        if key in entry:
            _check_number(entry[key], where, key, "a positive focal length in pixels", lambda v: v > 0)
    for key, size in (("cx", "w"), ("cy", "h")):
        if key in entry:
            limit = scope.get(size)
            bound = float(limit) if is_number(limit) else math.inf
            rule = f"a principal point inside the image (0 to {size}={limit})" if is_number(limit) else "a number >= 0"
            _check_number(entry[key], where, key, rule, lambda v, b=bound: 0 <= v <= b)
    for key in DISTORTION_KEYS + ("applied_scale", "fisheye_crop_radius"):
        if key in entry:
            positive = key in ("applied_scale", "fisheye_crop_radius")
            _check_number(entry[key], where, key, "a positive number" if positive else "a finite number",
                          (lambda v: v > 0) if positive else (lambda v: True))  # fmt: skip
    if "distortion_params" in entry:
        params = entry["distortion_params"]
        if not isinstance(params, list) or len(params) != 6 or not all(is_number(v) and math.isfinite(v) for v in params):
            raise CertSDFInputError(
                f"{where}: 'distortion_params' is {params!r}; it must be a list of 6 finite numbers (k1, k2, k3, k4, p1, p2)."
            )
    if "camera_model" in entry:
        from nerfstudio.cameras.cameras import CAMERA_MODEL_TO_TYPE  # (an unknown name is a KeyError in its parser)

        if not isinstance(entry["camera_model"], str) or entry["camera_model"] not in CAMERA_MODEL_TO_TYPE:
            raise CertSDFInputError(
                f"{where}: 'camera_model' is {entry['camera_model']!r}; nerfstudio knows {', '.join(CAMERA_MODEL_TO_TYPE)}."
            )


def blender_split_file(data: Path, split: str) -> Path:
    """transforms_{split}.json, with certsdf's fallback from a missing val split to test."""
    path = data / f"transforms_{split}.json"
    if split == "val" and not path.exists():
        return data / "transforms_test.json"
    return path


def validate_blender_split(data: Path, split: str) -> SplitReport:
    """Check one split of a Blender/NeRF-synthetic scene (transforms_{split}.json + PNG images)."""
    transforms = blender_split_file(data, split)
    meta = load_transforms(transforms)
    angle = meta.get("camera_angle_x")
    if not is_number(angle) or not (0.0 < float(angle) < math.pi):
        raise CertSDFInputError(
            f"{transforms}: 'camera_angle_x' (horizontal field of view in radians) is "
            f"{'missing' if angle is None else f'invalid ({angle!r})'}; Blender-format scenes need it."
        )
    # nerfstudio's Blender parser: data / (file_path without "./") + ".png". Where the cameras stand matters
    # for training only: val and test splits may hold a single view.
    return _check_frames(
        transforms, meta["frames"], lambda f: data / (f["file_path"].replace("./", "") + ".png"), check_centres=split == "train"
    )


def validate_nerfstudio(data: Path, single_channel_masks: bool = False) -> SplitReport:
    """Check a nerfstudio-format transforms.json: intrinsics, poses and every image."""
    transforms = data if data.suffix == ".json" else data / "transforms.json"
    root = transforms.parent
    meta = load_transforms(transforms)
    for key in NERFSTUDIO_INTRINSICS:
        if key in meta:
            continue
        for i, frame in enumerate(meta["frames"]):
            if not isinstance(frame, dict) or key not in frame:
                raise CertSDFInputError(
                    f"{transforms}, frame {i}: camera intrinsic '{key}' is given neither at the top level nor in "
                    f"the frame; nerfstudio-format scenes need {', '.join(NERFSTUDIO_INTRINSICS)}."
                )

    check_camera_fields(meta, str(transforms))
    for i, frame in enumerate(meta["frames"]):
        if isinstance(frame, dict):
            check_camera_fields(frame, f"{transforms}, frame {i}", defaults=meta)

    def declared(frame: Dict[str, Any]) -> Tuple[int, int]:
        return int(frame.get("w", meta.get("w"))), int(frame.get("h", meta.get("h")))

    report = _check_frames(transforms, meta["frames"], lambda f: root / f["file_path"], expected_size=declared)
    check_mask_paths(transforms, meta["frames"], root, report, single_channel=single_channel_masks)
    return report


def check_mask_paths(
    transforms: Path, frames: List[Dict[str, Any]], root: Path, report: SplitReport, single_channel: bool
) -> None:
    """Per-frame `mask_path`: on every frame or none, each readable and of its image's size.

    `single_channel`: nerfstudio's own mask loader (sampling masks) accepts one band only.
    """
    with_mask = [i for i, f in enumerate(frames) if "mask_path" in f]
    if not with_mask:
        return
    if len(with_mask) != len(frames):
        missing = next(i for i, f in enumerate(frames) if "mask_path" not in f)
        raise CertSDFInputError(
            f"{transforms}: {len(with_mask)} of {len(frames)} frames have a 'mask_path' (frame {missing} has none); "
            "give a mask for every frame or for none."
        )
    for i, (frame, image) in enumerate(zip(frames, report.image_files)):
        mask = root / frame["mask_path"]
        where = f"{transforms}, frame {i} (mask_path '{frame['mask_path']}')"
        if not mask.is_file():
            raise CertSDFInputError(f"{where}: mask {mask} does not exist.")
        report.add_mask(mask, check_mask(mask, image, where, single_channel))


def check_mask(mask: Path, image: Path, where: str, single_channel: bool = False) -> Optional[str]:
    """A mask must be readable and of its image's size (and one band for nerfstudio's loader, which
    `single_channel` also means: sampling masks). Returns "all black" or "all white" for a mask without
    a boundary (no pixel, or every pixel, set; see SAMPLING_MASK_LEVEL, OBJECT_MASK_LEVEL), else None."""
    (mw, mh), _ = check_image(mask, where)
    with Image.open(image) as im:
        iw, ih = im.size
    if (mw, mh) != (iw, ih):
        raise CertSDFInputError(f"{where}: mask {mask} is {mw}x{mh} but its image {image} is {iw}x{ih}.")
    with Image.open(mask) as m:
        bands = m.getbands()
        if single_channel and len(bands) != 1:
            raise CertSDFInputError(
                f"{where}: mask {mask} has {len(bands)} channels ({''.join(bands)}); nerfstudio's sampling masks "
                "must be single-channel (L or 1)."
            )
        low, high = m.convert("L").getextrema()
    level = SAMPLING_MASK_LEVEL if single_channel else OBJECT_MASK_LEVEL
    return "all black" if high <= level else "all white" if low > level else None


def masks_carry_silhouettes(report: SplitReport) -> bool:
    """Whether the scene's masks say where the object is. A set in which every mask is all black or all
    white (no mask has a boundary) does not: it is dropped with a warning and training goes on without
    masks (all black would sample no ray, or empty the scene; all white would fill every view's frustum).
    Blank masks among masks with a boundary are kept, and counted: an all-black mask is a view where the
    object is out of frame, an all-white one a view filled by it."""
    if not report.masks:
        return True
    blank = sum(len(masks) for masks in report.blank_masks.values())
    kinds = ", ".join(f"{len(masks)} {kind} (e.g. {masks[0]})" for kind, masks in sorted(report.blank_masks.items()))
    if blank == len(report.masks):
        warn(
            f"{report.transforms}: none of the {len(report.masks)} masks has a boundary between object and background: "
            f"{kinds}. Such masks carry no silhouette, so training goes on without masks. Masks count when at least one "
            "has both set and unset pixels; all-black or all-white masks among those are kept (the object out of "
            "view, or filling it). Fix the masks (inverted? written as 0/1 instead of 0/255?), or pass "
            "--pipeline.datamanager.dataparser.use-masks False to silence this."
        )
        return False
    if blank:
        log(f"{report.transforms}: {blank} of {len(report.masks)} masks have no boundary ({kinds}); kept, as views "
            "where the object is out of frame (all black) or fills it (all white).")  # fmt: skip
    return True


def estimate_background(files: List[Path]) -> Tuple[Float[Tensor, "3"], float]:
    """Median colour of the image borders of a few frames, and the fraction of border pixels near it."""
    picks = [files[int(i)] for i in np.linspace(0, len(files) - 1, min(BACKGROUND_SAMPLE_IMAGES, len(files)))]
    borders = []
    for path in picks:
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
        borders += [rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]]
    pixels = np.concatenate(borders, axis=0)
    median = np.median(pixels, axis=0)
    uniform = float((np.abs(pixels - median).max(axis=1) < BACKGROUND_SPREAD).mean())
    return torch.tensor(median, dtype=torch.float32), uniform


def background_for_rgb_images(report: SplitReport, real_capture: bool = False) -> Tuple[Float[Tensor, "3"], bool]:
    """The fixed background to train and evaluate with when the images have no alpha, and whether
    the scene is a real capture.

    With RGB targets, certsdf's default random-background training composites the random
    colour on the *prediction* only (the target has no alpha to composite), so empty space is
    penalised wherever the image background differs from the random colour: the model would
    build the background into geometry at the walls of the scene box. With a constant
    background equal to the images' own, empty space reproduces the background for free.

    A background that is not one plain colour (or `real_capture`, known from the format) marks
    a real capture: a photograph whose background reaches beyond the scene box. That is recorded
    (:data:`REAL_CAPTURE_KEY`) rather than refused, so a background model can take it over.
    """
    colour, uniform = estimate_background(report.image_files)
    rgb = ", ".join(f"{c:.2f}" for c in colour.tolist())
    real = real_capture or uniform < BACKGROUND_UNIFORM_FRACTION
    if real:
        log(
            f"{report.transforms}: real capture (images without alpha; {uniform:.0%} of the border pixels are "
            f"near their median colour). The certified grid covers the object's region "
            f"and a background model renders what lies outside it; object masks (a mask/ folder, or mask_path in "
            "transforms.json) supervise the object's silhouette."
        )
    else:
        warn(
            f"the images of {report.transforms} have no alpha channel, so training cannot "
            f"use random backgrounds. Training and evaluation composite the constant background ({rgb}) estimated "
            f"from the image borders instead."
        )
    return colour, real


COLMAP_MODEL_DIRS = ("sparse/0", "colmap/sparse/0", "sparse")
"""Where a COLMAP reconstruction is looked for, relative to the scene folder (first match wins)."""


def colmap_model_dir(data: Path) -> Optional[Path]:
    """The first of COLMAP_MODEL_DIRS holding cameras or images (.bin or .txt), or None."""
    for rel in COLMAP_MODEL_DIRS:
        folder = data / rel
        if any((folder / f"{name}.{ext}").is_file() for name in ("cameras", "images") for ext in ("bin", "txt")):
            return folder
    return None


def validate_colmap(data: Path, model_dir: Path, images_dir: Path) -> SplitReport:
    """Check a COLMAP scene: cameras and images files present, every registered image on disk at its camera's size."""
    # nerfstudio's own COLMAP reader (the dataparser reads the model again with it).
    from nerfstudio.data.utils import colmap_parsing_utils as colmap_utils

    ext = "bin" if (model_dir / "cameras.bin").is_file() or (model_dir / "images.bin").is_file() else "txt"
    cameras_file, images_file = model_dir / f"cameras.{ext}", model_dir / f"images.{ext}"
    for path, what in ((cameras_file, "the camera intrinsics"), (images_file, "the image poses")):
        if not path.is_file():
            raise CertSDFInputError(
                f"{path} does not exist; a COLMAP scene needs cameras.{ext} and images.{ext} ({what}) in {model_dir}."
            )
    try:
        if ext == "bin":
            cameras, images = colmap_utils.read_cameras_binary(cameras_file), colmap_utils.read_images_binary(images_file)
        else:
            cameras, images = colmap_utils.read_cameras_text(cameras_file), colmap_utils.read_images_text(images_file)
    except (OSError, ValueError, KeyError, IndexError, struct_error) as err:
        raise CertSDFInputError(f"{model_dir}: the COLMAP model cannot be read ({type(err).__name__}: {err}).") from err
    if not images:
        raise CertSDFInputError(f"{images_file} registers no images: nothing to train on.")
    check_colmap_points(model_dir)
    # nerfstudio's parser converts every camera (unsupported models raise deep inside it) and
    # asserts one model for the whole scene; both are checked here to name the file instead.
    from nerfstudio.process_data.colmap_utils import parse_colmap_camera_params

    for camera in cameras.values():
        where = f"{cameras_file}, camera {camera.id}"
        try:
            params = parse_colmap_camera_params(camera)
        except (NotImplementedError, ValueError) as err:
            raise CertSDFInputError(f"{where}: {err}") from err
        # The intrinsics as nerfstudio will read them (fl_x, fl_y, cx, cy, w, h, distortion): a focal length of 0
        # or a NaN would otherwise reach the cameras.
        params.pop("camera_model", None)
        check_camera_fields(params, where)
    models = sorted({cameras[entry.camera_id].model for entry in images.values() if entry.camera_id in cameras})
    if len(models) > 1:
        raise CertSDFInputError(
            f"{cameras_file}: the images use several camera models ({', '.join(models)}); nerfstudio's COLMAP "
            "parser needs one (re-run COLMAP with a single camera model)."
        )
    names, centres = [], []
    for image_id in sorted(images):
        entry = images[image_id]
        names.append(f"image {image_id} ('{entry.name}')")
        if entry.camera_id not in cameras:
            raise CertSDFInputError(f"{images_file}, {names[-1]}: camera {entry.camera_id} is not in {cameras_file}.")
        # COLMAP stores world-to-camera poses (the rotation as quaternion qvec, nerfstudio's qvec2rotmat); the
        # camera stands at -Rᵀ·tvec.
        w2c = np.eye(4)
        w2c[:3, :3], w2c[:3, 3] = colmap_utils.qvec2rotmat(entry.qvec), entry.tvec
        w2c = check_pose(w2c, f"{images_file}, {names[-1]}", what="its pose (qvec, tvec)").numpy()
        centres.append(-w2c[:3, :3].T @ w2c[:3, 3])
    check_camera_centres(np.stack(centres), images_file, names)
    files: List[Path] = []
    for name, image_id in zip(names, sorted(images)):
        entry = images[image_id]
        where = f"{images_file}, {name}"
        size, _ = check_image(images_dir / entry.name, where)
        camera = cameras[entry.camera_id]
        if size != (camera.width, camera.height):
            raise CertSDFInputError(
                f"{where}: image {images_dir / entry.name} is {size[0]}x{size[1]} but camera {entry.camera_id} in "
                f"{cameras_file} is {camera.width}x{camera.height}."
            )
        files.append(images_dir / entry.name)
    return SplitReport(transforms=images_file, image_files=files, has_alpha=False)


def check_colmap_points(model_dir: Path) -> None:
    """The optional sparse points (points3D.bin or .txt), which the dataparser loads when present: a file
    that cannot be read is named, with the way out (they are optional)."""
    from nerfstudio.data.utils import colmap_parsing_utils as colmap_utils

    for path, read in ((model_dir / "points3D.bin", colmap_utils.read_points3D_binary), (model_dir / "points3D.txt", colmap_utils.read_points3D_text)):
        if not path.is_file():
            continue
        try:
            read(path)
        except (OSError, ValueError, KeyError, IndexError, OverflowError, MemoryError, struct_error) as err:
            raise CertSDFInputError(
                f"{path}: the sparse points cannot be read ({type(err).__name__}: {err}). They are optional: "
                "move the file away to train without them."
            ) from err
        return


def check_colmap_masks(report: SplitReport, masks_dir: Path, single_channel: bool) -> None:
    """nerfstudio's COLMAP parser reads masks/<image name>.png for every image when masks/ exists."""
    for image in report.image_files:
        mask = (masks_dir / image.name).with_suffix(".png")
        where = f"{masks_dir} (mask of {image.name})"
        if not mask.is_file():
            raise CertSDFInputError(
                f"{where}: mask {mask} does not exist; with a masks/ folder every image needs masks/<name>.png."
            )
        report.add_mask(mask, check_mask(mask, image, where, single_channel))


def validate_split(data: Path, fmt: str, split: str, single_channel_masks: bool = False) -> SplitReport:
    """Check the frames nerfstudio's parser will read for `split` of a scene in format `fmt`
    (blender or nerfstudio; NeuS/IDR and COLMAP have their own checks)."""
    if fmt == "blender":
        return validate_blender_split(data, split)
    return validate_nerfstudio(data, single_channel_masks=single_channel_masks)
