"""NeuS/IDR scenes (DTU, BlendedMVS as NeuS releases them): `cameras_sphere.npz`, `image/`, `mask/`.

Layout (NeuS's `Dataset` reads the same files)::

    cameras_sphere.npz   world_mat_i: 4×4 with the 3×4 projection K·[R|t] (data's world frame)
                         scale_mat_i: 4×4 similarity, x_world = scale_mat · x_sphere, that maps
                                      NeuS's unit sphere (which holds the object) to the world
    image/ or images/    the i-th image in sorted order goes with world_mat_i (PNG or JPEG)
    mask/ or masks/      optional; the i-th mask in sorted order (white = object)

Only two things are written by hand here: reading that layout and decomposing
P = world_mat_i · scale_mat_i into intrinsics and a camera-to-world pose in the unit-sphere
frame, exactly as NeuS's ``load_K_Rt_from_P`` does (OpenCV's decomposeProjectionMatrix).
Everything else is nerfstudio's: :class:`Cameras`, :class:`DataparserOutputs`, and
nerfstudio's interval split.

Frames. Cameras and the certified grid live in NeuS's unit-sphere frame (the scene box is
[-1, 1]³ by default, the sphere's box). The dataparser transform records the similarity
back to the data's world frame, so nerfstudio's ``dataparser_transforms.json`` (and
certsdf-export, which undoes it) give x_world = scale_mat · x_sphere: for DTU, millimetres in
the frame of DTU's ground-truth point clouds, as NeuS's own export.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Type

import cv2
import numpy as np
import torch
from jaxtyping import Float
from PIL import Image

from nerfstudio.cameras.cameras import Cameras, CameraType
from nerfstudio.data.dataparsers.base_dataparser import DataParser, DataParserConfig, DataparserOutputs
from nerfstudio.data.scene_box import SceneBox
from nerfstudio.data.utils.dataparsers_utils import get_train_eval_split_all, get_train_eval_split_interval

from certsdf_ns.console import warn
from certsdf_ns.data.validation import FOREGROUND_MASKS_KEY, SplitReport, check_camera_centres, check_image, check_mask
from certsdf_ns.errors import CertSDFInputError

NEUS_CAMERAS = "cameras_sphere.npz"
IMAGE_DIRS = ("image", "images")
MASK_DIRS = ("mask", "masks")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# A scale_mat must be a similarity (uniform scale, rotation, translation); NeuS's preprocessing
# writes s·I. Relative tolerance on |MᵀM/s² − I|.
SIMILARITY_TOLERANCE = 1e-4
# nerfstudio's Cameras have no skew; DTU's decomposed K has |skew| ~ 1e-4 px. Larger skews warn.
SKEW_TOLERANCE_PX = 0.05
# The left 3×3 of a projection K·R is singular (no camera centre; OpenCV's decomposition asserts) when its
# smallest singular value is at most this fraction of its largest. A real K gives about 1/(2·focal in pixels)
# (DTU: 6e-4); 1e-7 is float32's precision, below which a stored matrix cannot be told from a singular one.
SINGULAR_TOLERANCE = 1e-7


# ---------------------------------------------------------------------------------------- maths
def decompose_projection(
    projection: Float[np.ndarray, "3 4"],
) -> Tuple[Float[np.ndarray, "3 3"], Float[np.ndarray, "4 4"]]:
    """Intrinsics K (K[2,2] = 1) and the OpenCV camera-to-world pose of P = K·[R|t].

    NeuS's ``load_K_Rt_from_P``: cv2.decomposeProjectionMatrix gives K, the world-to-camera
    rotation R and the homogeneous camera centre; the pose is [Rᵀ | centre].
    """
    K, R, centre = cv2.decomposeProjectionMatrix(np.asarray(projection, dtype=np.float64))[:3]
    K = K / K[2, 2]
    pose = np.eye(4)
    pose[:3, :3] = R.T
    pose[:3, 3] = (centre[:3] / centre[3])[:, 0]
    return K, pose


def opencv_to_opengl(c2w: Float[np.ndarray, "4 4"]) -> Float[np.ndarray, "4 4"]:
    """OpenCV camera axes (x right, y down, z forward) to nerfstudio's OpenGL axes (y up, z back)."""
    out = np.array(c2w, dtype=np.float64, copy=True)
    out[:3, 1:3] *= -1.0
    return out


def similarity_of(scale_mat: Float[np.ndarray, "4 4"], where: str) -> Tuple[float, Float[np.ndarray, "3 3"], Float[np.ndarray, "3"]]:
    """(s, R, c) with scale_mat = [[s·R, c], [0, 1]]; refuses anything that is not a similarity,
    because the mesh export undoes it with one uniform scale."""
    m = np.asarray(scale_mat, dtype=np.float64)
    if m.shape != (4, 4) or not np.isfinite(m).all():
        raise CertSDFInputError(f"{where} must be a finite 4x4 matrix, got shape {m.shape}.")
    linear = m[:3, :3]
    det = float(np.linalg.det(linear))
    if det <= 0:
        raise CertSDFInputError(f"{where} has determinant {det:.3g}; it must map the unit sphere to the world (det > 0).")
    s = det ** (1.0 / 3.0)
    rotation = linear / s
    error = float(np.abs(rotation.T @ rotation - np.eye(3)).max())
    if error > SIMILARITY_TOLERANCE or not np.allclose(m[3], [0.0, 0.0, 0.0, 1.0]):
        raise CertSDFInputError(
            f"{where} is not a similarity (uniform scale, rotation, translation; max |RᵀR − I| = {error:.2g}): "
            "certsdf maps meshes back to the data's frame with one uniform scale."
        )
    return s, rotation, m[:3, 3].copy()


def world_to_sphere(scale_mat: Float[np.ndarray, "4 4"], where: str) -> Tuple[Float[np.ndarray, "3 4"], float]:
    """nerfstudio's (dataparser_transform T, dataparser_scale k) with x_sphere = k·(T·[x_world; 1]).

    With scale_mat = [[s·R, c], [0, 1]]: x_sphere = (1/s)·Rᵀ·(x_world − c), so T = [Rᵀ | −Rᵀc], k = 1/s.
    """
    s, rotation, centre = similarity_of(scale_mat, where)
    transform = np.concatenate([rotation.T, (-rotation.T @ centre)[:, None]], axis=1)
    return transform, 1.0 / s


# --------------------------------------------------------------------------------------- layout
@dataclass
class NeuSLayout:
    """The files of a NeuS/IDR scene."""

    cameras: Path
    """cameras_sphere.npz."""
    images: List[Path]
    """Images in sorted order; the i-th goes with world_mat_i."""
    masks: Optional[List[Path]]
    """Masks in sorted order (white = object), or None when the scene has none."""


def _pictures(folder: Path) -> List[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def read_layout(data: Path) -> NeuSLayout:
    """Find cameras_sphere.npz, the image folder and the optional mask folder."""
    cameras = data / NEUS_CAMERAS
    if not cameras.is_file():
        raise CertSDFInputError(f"{cameras} does not exist; NeuS/IDR scenes need it.")
    image_dir = next((data / d for d in IMAGE_DIRS if (data / d).is_dir()), None)
    if image_dir is None:
        raise CertSDFInputError(f"{data} has {NEUS_CAMERAS} but no image/ (or images/) folder.")
    images = _pictures(image_dir)
    if not images:
        raise CertSDFInputError(f"{image_dir} holds no PNG or JPEG images.")
    mask_dir = next((data / d for d in MASK_DIRS if (data / d).is_dir()), None)
    masks = None
    if mask_dir is not None:
        masks = _pictures(mask_dir)
        if len(masks) != len(images):
            raise CertSDFInputError(
                f"{mask_dir} holds {len(masks)} masks but {image_dir} holds {len(images)} images; "
                "NeuS/IDR scenes need one mask per image (same sorted order), or no mask folder."
            )
    return NeuSLayout(cameras=cameras, images=images, masks=masks)


def load_matrices(layout: NeuSLayout) -> Tuple[List[np.ndarray], List[np.ndarray]]:
    """world_mat_i and scale_mat_i for every image; names the file and key that is missing."""
    try:
        npz = np.load(layout.cameras)
        keys = set(npz.files)
    except (OSError, ValueError) as err:
        raise CertSDFInputError(f"{layout.cameras} cannot be read as a .npz archive ({err}).") from err
    n = len(layout.images)
    n_world = sum(1 for k in keys if k.startswith("world_mat_") and not k.startswith("world_mat_inv"))
    if n_world == 0:
        raise CertSDFInputError(
            f"{layout.cameras} has no world_mat_i keys (found: {', '.join(sorted(keys)[:6]) or 'none'}); "
            "NeuS/IDR cameras need world_mat_0 … world_mat_{n-1} (and scale_mat_i)."
        )
    world, scale = [], []
    for i in range(n):
        if f"world_mat_{i}" not in keys:
            raise CertSDFInputError(
                f"{layout.cameras} has {n_world} cameras (world_mat_i) but there are {n} images "
                f"(no world_mat_{i} for {layout.images[i].name}); every image needs a camera."
            )
        where = f"{layout.cameras}: world_mat_{i} (camera of {layout.images[i].name})"
        w = np.asarray(npz[f"world_mat_{i}"], dtype=np.float64)
        if w.shape not in ((4, 4), (3, 4)):
            raise CertSDFInputError(f"{where} must be a 4x4 (or 3x4) matrix, got shape {w.shape}.")
        if not np.isfinite(w).all():
            raise CertSDFInputError(f"{where} contains NaN or infinite values.")
        spread = np.linalg.svd(w[:3, :3], compute_uv=False)
        if spread[2] <= SINGULAR_TOLERANCE * spread[0]:
            raise CertSDFInputError(
                f"{where} is singular: its left 3x3 block, K·R of the projection K·[R|t], has rank "
                f"{int((spread > SINGULAR_TOLERANCE * spread[0]).sum())} (singular values "
                f"{', '.join(f'{v:.3g}' for v in spread)}), so it is no camera (no centre, no focal length). "
                "A zero or placeholder matrix looks like this; write the camera's projection there."
            )
        # NeuS: scale_mat_i defaults to the identity when absent (IDR's cameras.npz has none).
        s = np.asarray(npz[f"scale_mat_{i}"], dtype=np.float64) if f"scale_mat_{i}" in keys else np.eye(4)
        world.append(w[:3, :4])
        scale.append(s)
    return world, scale


def neus_camera(layout: NeuSLayout, world_mats: List[np.ndarray], scale_mats: List[np.ndarray], i: int) -> Tuple[np.ndarray, np.ndarray]:
    """Intrinsics and OpenCV camera-to-world pose (unit-sphere frame) of view `i`; its focal lengths must be positive."""
    K, c2w = decompose_projection(world_mats[i] @ scale_mats[i])
    if not (K[0, 0] > 0 and K[1, 1] > 0):  # (NaN fails too)
        raise CertSDFInputError(
            f"{layout.cameras}: world_mat_{i} (camera of {layout.images[i].name}) gives focal lengths "
            f"{K[0, 0]:.4g}, {K[1, 1]:.4g}; they must be positive."
        )
    return K, c2w


def validate_neus(data: Path, single_channel_masks: bool = False) -> SplitReport:
    """Check a NeuS/IDR scene: layout, every camera (and where they stand) before any image, then the images
    and masks: readable and of one size (masks single-channel when `single_channel_masks`, for nerfstudio's
    sampling masks)."""
    layout = read_layout(data)
    world_mats, scale_mats = load_matrices(layout)
    world_to_sphere(one_scale_mat(layout, scale_mats), f"{layout.cameras}: scale_mat_0")
    centres = [neus_camera(layout, world_mats, scale_mats, i)[1][:3, 3] for i in range(len(layout.images))]
    names = [f"world_mat_{i} (camera of {path.name})" for i, path in enumerate(layout.images)]
    check_camera_centres(np.stack(centres), layout.cameras, names)
    report = SplitReport(transforms=layout.cameras, image_files=layout.images, has_alpha=False)
    first: Optional[Tuple[Path, Tuple[int, int]]] = None
    for i, path in enumerate(layout.images):
        size, _ = check_image(path, f"{data}, image {i}")
        if first is None:
            first = (path, size)
        elif size != first[1]:
            raise CertSDFInputError(
                f"image {path} is {size[0]}x{size[1]} but {first[0]} is {first[1][0]}x{first[1][1]}; "
                "NeuS/IDR images must share one size."
            )
        if layout.masks is not None:
            report.add_mask(layout.masks[i], check_mask(layout.masks[i], path, f"{data}, mask {i}", single_channel_masks))
    # NeuS images are RGB photographs; an alpha channel, if any, is not used (masks are).
    return report


# ----------------------------------------------------------------------------------- dataparser
@dataclass
class NeuSDataParserConfig(DataParserConfig):
    """NeuS/IDR scene (cameras_sphere.npz + image/ + optional mask/), in NeuS's unit-sphere frame."""

    _target: Type = field(default_factory=lambda: NeuSDataParser)
    data: Path = Path()
    """Scene folder holding cameras_sphere.npz."""
    box_radius: float = 1.0
    """Half edge of the scene box (the certified grid) in the unit-sphere frame; 1 is the unit sphere's box."""
    eval_every: int = 8
    """Every N-th view (0, N, 2N, …) is held out for evaluation; 0 trains and evaluates on all views."""


def one_scale_mat(layout: NeuSLayout, scale_mats: List[np.ndarray]) -> np.ndarray:
    """The scene's sphere→world similarity; NeuS allows one per image, the mesh export needs one."""
    for i, s in enumerate(scale_mats[1:], start=1):
        if not np.allclose(s, scale_mats[0], rtol=1e-6, atol=1e-6):
            raise CertSDFInputError(
                f"{layout.cameras}: scale_mat_{i} differs from scale_mat_0; certsdf needs one sphere→world "
                "transform for the whole scene."
            )
    return scale_mats[0]


def sphere_cameras(
    layout: NeuSLayout, world_mats: List[np.ndarray], scale_mats: List[np.ndarray], indices: Sequence[int]
) -> Cameras:
    """nerfstudio Cameras (OpenGL axes, unit-sphere frame) of the views `indices`."""
    intrinsics, poses = [], []
    for i in indices:
        K, c2w = neus_camera(layout, world_mats, scale_mats, i)
        intrinsics.append(K)
        poses.append(opencv_to_opengl(c2w)[:3, :4])
    K_all = np.stack(intrinsics)
    skew = float(np.abs(K_all[:, 0, 1]).max())
    if skew > SKEW_TOLERANCE_PX:
        warn(f"{layout.cameras}: the intrinsics have a skew of up to {skew:.3g} px, which nerfstudio's cameras ignore.")
    with Image.open(layout.images[0]) as im:  # validate_neus checked that all images share this size
        width, height = im.size

    def column(values: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(values, dtype=torch.float32)[:, None]

    return Cameras(
        camera_to_worlds=torch.as_tensor(np.stack(poses), dtype=torch.float32),
        fx=column(K_all[:, 0, 0]),
        fy=column(K_all[:, 1, 1]),
        # OpenCV (DTU's calibration, NeuS's ray generation) puts pixel centres at integer
        # coordinates; nerfstudio, like COLMAP, at +0.5 (rays through (i + 0.5, j + 0.5)).
        cx=column(K_all[:, 0, 2] + 0.5),
        cy=column(K_all[:, 1, 2] + 0.5),
        width=torch.full((len(poses), 1), width, dtype=torch.int32),
        height=torch.full((len(poses), 1), height, dtype=torch.int32),
        camera_type=CameraType.PERSPECTIVE,
    )


def split_indices(num_views: int, split: str, eval_every: int) -> List[int]:
    """nerfstudio's interval split: views 0, N, 2N, … are evaluation views; N ≤ 0 uses every view for both."""
    views = list(range(num_views))
    i_train, i_eval = (
        get_train_eval_split_interval(views, eval_every) if eval_every > 0 else get_train_eval_split_all(views)
    )
    return [int(i) for i in (i_train if split == "train" else i_eval)]


class NeuSDataParser(DataParser):
    """Reads a NeuS/IDR scene into nerfstudio's Cameras, with masks and the sphere→world transform."""

    config: NeuSDataParserConfig

    def _generate_dataparser_outputs(self, split: str = "train", **kwargs) -> DataparserOutputs:
        layout = read_layout(Path(self.config.data))
        world_mats, scale_mats = load_matrices(layout)
        transform, scale = world_to_sphere(one_scale_mat(layout, scale_mats), f"{layout.cameras}: scale_mat_0")
        indices = split_indices(len(layout.images), split, self.config.eval_every)
        r = float(self.config.box_radius)
        return DataparserOutputs(
            image_filenames=[layout.images[i] for i in indices],
            cameras=sphere_cameras(layout, world_mats, scale_mats, indices),
            scene_box=SceneBox(aabb=torch.tensor([[-r, -r, -r], [r, r, r]], dtype=torch.float32)),
            mask_filenames=None if layout.masks is None else [layout.masks[i] for i in indices],
            # x_sphere = scale·(transform·[x_world; 1]): what certsdf-export undoes to write meshes in the data's frame.
            dataparser_transform=torch.as_tensor(transform, dtype=torch.float32),
            dataparser_scale=float(scale),
            metadata={FOREGROUND_MASKS_KEY: layout.masks is not None},
        )
