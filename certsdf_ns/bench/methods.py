"""How each benchmarked method is trained: its own `ns-train` command line on a Blender scene
(or, for `certsdf-bench real`, on a real capture: :class:`NerfactoRealSpec`, :func:`real_methods`).

All methods get the same data (the scene's train split at the same image resolution, via
`camera-res-scale-factor`), the same number of rays per batch, the CPU device and fp32 when
there is no GPU, tensorboard only, and evaluation steps set so far apart that evaluation never
steals training time. Method-specific flags are the ones nerfstudio itself uses for Blender
scenes (`nerfstudio/scripts/benchmarking/launch_train_blender.sh`), adapted to 1.1.5 where the
camera optimiser is a model option.
"""

from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

# Half the diagonal of the [-1.5, 1.5]^3 scene box every Blender scene uses here.
BOX_HALF_DIAGONAL = 1.5 * math.sqrt(3.0)
NEVER = 1_000_000_000  # "every NEVER steps": evaluation effectively off


@dataclass
class TrainSettings:
    """What every method shares in one benchmark run."""

    rays_per_batch: int = 4096
    """train_num_rays_per_batch for every method."""
    camera_res_scale_factor: float = 1.0
    """Image (and intrinsics) rescaling applied by the datamanager, e.g. 0.25 for lego at 200x200."""
    steps_per_save: int = 50
    """Checkpoint interval in steps (the runner prunes checkpoints it will not evaluate)."""
    device: str = "cpu"
    """'cpu' or 'cuda'."""
    scratch_dir: Path = Path("bench_results/scenes")
    """Where converted copies of a scene are written (the source data may be read-only)."""


@dataclass
class MethodSpec:
    """One method: its ns-train name, how it is launched, and where it can run."""

    name: str
    """Label in results (usually the ns-train method name)."""
    ns_method: str
    """Method name given to ns-train."""
    needs_cuda: bool = False
    """True when the method cannot be constructed or trained without CUDA."""
    cuda_reason: str = ""
    """Why it needs CUDA (printed and written to the results when it is skipped)."""
    peer: bool = True
    """Peers are launched with the LPIPS stub; certsdf is the method under test."""
    extra_args: List[str] = field(default_factory=list)
    """Additional ns-train options (before the dataparser subcommand)."""

    def runnable(self) -> Tuple[bool, str]:
        if self.needs_cuda and not torch.cuda.is_available():
            return False, f"not runnable here (needs CUDA): {self.cuda_reason}"
        return True, ""

    def train_args(self, scene: Path, settings: TrainSettings) -> List[str]:
        """ns-train arguments after the method name, dataparser subcommand included."""
        common = [
            "--pipeline.datamanager.train-num-rays-per-batch", str(settings.rays_per_batch),
            "--pipeline.datamanager.camera-res-scale-factor", str(settings.camera_res_scale_factor),
            "--machine.device-type", settings.device,
        ]  # fmt: skip
        if settings.device != "cuda":  # fp16 autocast is CUDA-only; on CUDA each method keeps its own choice
            common += ["--mixed-precision", "False"]
        return [*common, *self.method_args(scene, settings), *self.extra_args, *self.data_args(scene, settings)]

    def method_args(self, scene: Path, settings: TrainSettings) -> List[str]:
        return []

    def data_args(self, scene: Path, settings: TrainSettings) -> List[str]:
        return ["blender-data", "--data", str(scene)]


def near_far(scene: Path) -> Tuple[float, float]:
    """Near/far planes bracketing the scene box from every training camera.

    nerfstudio's Blender recipe uses 2/6 for cameras at radius 4; generated scenes may place
    cameras further out, so the planes are derived from the actual camera distances.
    """
    frames = json.loads((scene / "transforms_train.json").read_text())["frames"]
    dist = np.linalg.norm(np.array([f["transform_matrix"] for f in frames])[:, :3, 3], axis=-1)
    return max(0.05, float(dist.min()) - BOX_HALF_DIAGONAL), float(dist.max()) + BOX_HALF_DIAGONAL


@dataclass
class CertSDFSpec(MethodSpec):
    """certsdf uses its own format-detecting dataparser: `--data DIR`, no subcommand."""

    name: str = "certsdf"
    ns_method: str = "certsdf"
    peer: bool = False

    def data_args(self, scene: Path, settings: TrainSettings) -> List[str]:
        return ["--data", str(scene)]


@dataclass
class NerfactoSpec(MethodSpec):
    name: str = "nerfacto"
    ns_method: str = "nerfacto"

    def method_args(self, scene: Path, settings: TrainSettings) -> List[str]:
        near, far = near_far(scene)
        args = [
            "--pipeline.model.background-color", "white",
            "--pipeline.model.proposal-initial-sampler", "uniform",
            "--pipeline.model.near-plane", f"{near:.3f}",
            "--pipeline.model.far-plane", f"{far:.3f}",
            "--pipeline.model.camera-optimizer.mode", "off",
            # Synthetic scenes have no per-image appearance changes; a per-image embedding would
            # only absorb noise and be replaced by zeros at evaluation (nerfstudio's recipe disables
            # the average embedding for the same reason).
            "--pipeline.model.use-appearance-embedding", "False",
            "--pipeline.model.distortion-loss-mult", "0",
            "--pipeline.model.disable-scene-contraction", "True",
        ]  # fmt: skip
        if not _has_tcnn(settings):
            # Without tinycudann nerfacto falls back to torch anyway; saying so avoids a warning per field.
            args += ["--pipeline.model.implementation", "torch"]
        return args


@dataclass
class NerfactoRealSpec(NerfactoSpec):
    """nerfacto on a real capture (`certsdf-bench real`): nerfstudio's defaults for unbounded real
    scenes (scene contraction, near 0.05 / far 1000, proposal sampler, appearance embedding,
    'last_sample' background, distortion loss), except the camera optimiser, which is off so that
    both methods keep the same poses. Without tinycudann, the torch implementation. The dataparser
    subcommand and its options are the scene's (see :mod:`certsdf_ns.bench.real`)."""

    dataparser: List[str] = field(default_factory=lambda: ["nerfstudio-data"])
    """Dataparser subcommand, then its options; `--data SCENE` goes right after the subcommand."""

    def method_args(self, scene: Path, settings: TrainSettings) -> List[str]:
        args = ["--pipeline.model.camera-optimizer.mode", "off"]
        if not _has_tcnn(settings):
            args += ["--pipeline.model.implementation", "torch"]
        return args

    def data_args(self, scene: Path, settings: TrainSettings) -> List[str]:
        subcommand, *options = self.dataparser
        return [subcommand, "--data", str(scene), *options]


@dataclass
class TensoRFSpec(MethodSpec):
    """tensorf's defaults already target Blender scenes (white background, no camera optimiser)."""

    name: str = "tensorf"
    ns_method: str = "tensorf"


@dataclass
class InstantNGPSpec(MethodSpec):
    name: str = "instant-ngp"
    ns_method: str = "instant-ngp"
    needs_cuda: bool = True
    cuda_reason: str = "ray marching uses nerfacc's CUDA kernels (OccGridEstimator)"

    def method_args(self, scene: Path, settings: TrainSettings) -> List[str]:
        near, far = near_far(scene)
        return [
            "--pipeline.model.background-color", "white",
            "--pipeline.model.disable-scene-contraction", "True",
            "--pipeline.model.near-plane", f"{near:.3f}",
            "--pipeline.model.far-plane", f"{far:.3f}",
        ]  # fmt: skip


@dataclass
class NeuSSpec(MethodSpec):
    """NeuS / NeuS-facto read SDFStudio-format data; the scene is converted (see `to_sdfstudio`)."""

    name: str = "neus"
    ns_method: str = "neus"
    needs_cuda: bool = True
    cuda_reason: str = "its SDF field builds a tinycudann encoding (tinycudann needs CUDA)"

    def method_args(self, scene: Path, settings: TrainSettings) -> List[str]:
        return ["--pipeline.model.background-color", "white"]

    def data_args(self, scene: Path, settings: TrainSettings) -> List[str]:
        out = to_sdfstudio(scene, Path(settings.scratch_dir) / f"{scene.name}_sdfstudio")
        return ["sdfstudio-data", "--data", str(out), "--auto-orient", "False"]


def to_sdfstudio(scene: Path, out: Path) -> Path:
    """Write `out/meta_data.json` (+ RGB images on white) from the Blender train split.

    SDFStudio frames use OpenCV camera axes and 4x4 intrinsics; auto-orientation is disabled
    at training time so the world frame stays the Blender one (the evaluator renders the
    Blender test cameras). Only used where CUDA is present; not exercised on CPU machines.
    """
    from PIL import Image

    if (out / "meta_data.json").exists():
        return out
    (out / "images").mkdir(parents=True, exist_ok=True)
    meta = json.loads((scene / "transforms_train.json").read_text())
    frames = []
    width = height = 0
    for i, frame in enumerate(meta["frames"]):
        rgba = np.asarray(Image.open(scene / (frame["file_path"].replace("./", "") + ".png")).convert("RGBA")) / 255.0
        rgb = rgba[..., :3] * rgba[..., 3:] + (1.0 - rgba[..., 3:])  # composite on white
        height, width = rgb.shape[:2]
        Image.fromarray(np.round(rgb * 255).astype(np.uint8)).save(out / "images" / f"{i:04d}.png")
        focal = 0.5 * width / math.tan(0.5 * float(meta["camera_angle_x"]))
        c2w = np.array(frame["transform_matrix"], dtype=np.float64)
        c2w[:3, 1:3] *= -1.0  # OpenGL -> OpenCV; the parser flips back
        intrinsics = np.eye(4)
        intrinsics[0, 0] = intrinsics[1, 1] = focal
        intrinsics[0, 2], intrinsics[1, 2] = width / 2.0, height / 2.0
        frames.append({"rgb_path": f"images/{i:04d}.png", "camtoworld": c2w.tolist(), "intrinsics": intrinsics.tolist()})
    near, far = near_far(scene)
    box = {"aabb": [[-1.5, -1.5, -1.5], [1.5, 1.5, 1.5]], "near": near, "far": far, "radius": 1.5, "collider_type": "box"}
    sdf_meta = {"camera_model": "OPENCV", "height": height, "width": width, "has_mono_prior": False,
                "scene_box": box, "frames": frames}  # fmt: skip
    (out / "meta_data.json").write_text(json.dumps(sdf_meta))
    return out


def _has_tcnn(settings: TrainSettings) -> bool:
    return settings.device == "cuda" and importlib.util.find_spec("tinycudann") is not None


def all_methods() -> Dict[str, MethodSpec]:
    """Every method the suites know, by name."""
    specs: List[MethodSpec] = [
        CertSDFSpec(),
        # certsdf with a dense feature volume instead of the hash grid for colour: the torch hash
        # grid's gather/scatter dominates a CPU step, so this is the CPU-speed variant.
        CertSDFSpec(name="certsdf-dense", extra_args=["--pipeline.model.colour-encoding", "dense"]),
        NerfactoSpec(),
        TensoRFSpec(),
        InstantNGPSpec(),
        NeuSSpec(),
        NeuSSpec(name="neus-facto", ns_method="neus-facto"),
    ]
    return {s.name: s for s in specs}


def real_methods() -> Dict[str, MethodSpec]:
    """The methods of the real-capture suite, by name: certsdf reads every format with `--data DIR`
    (so its Blender spec serves), nerfacto needs its real-scene settings and a dataparser per scene."""
    return {s.name: s for s in (CertSDFSpec(), NerfactoRealSpec())}


def get_method(name: str, extra_args: Optional[List[str]] = None, real: bool = False) -> MethodSpec:
    """A copy of the named spec (of :func:`real_methods` when `real`), with extra ns-train options appended."""
    import copy

    methods = real_methods() if real else all_methods()
    if name not in methods:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(methods)}")
    spec = copy.deepcopy(methods[name])
    spec.extra_args = [*spec.extra_args, *(extra_args or [])]
    return spec
