"""A dataparser that detects the scene format: Blender/NeRF-synthetic, nerfstudio, NeuS/IDR, COLMAP.

`ns-train certsdf --data DIR` takes no dataparser subcommand: this parser looks at DIR,
picks nerfstudio's own Blender, Nerfstudio or COLMAP parser (or :mod:`certsdf_ns.data.neus`
for NeuS/IDR, which nerfstudio does not read), and applies the matching preset from
`data_configs/` (shipped inside the package as ``certsdf_ns.data_configs``). Every scene is checked first (:mod:`certsdf_ns.data.validation`), so bad
input ends in one message naming the file, exit status 2.

It also fixes one trap of nerfstudio's Blender parser: trimmed copies of NeRF-synthetic often
lack `transforms_val.json`, and evaluation then falls back to the test split (with one
warning) instead of raising FileNotFoundError.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Literal, Optional, Tuple, Type

import torch

from nerfstudio.data.dataparsers.base_dataparser import DataParser, DataParserConfig, DataparserOutputs
from nerfstudio.data.dataparsers.blender_dataparser import Blender, BlenderDataParserConfig
from nerfstudio.data.dataparsers.colmap_dataparser import ColmapDataParserConfig
from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig
from nerfstudio.data.scene_box import SceneBox

from certsdf_ns.console import log, warn
from certsdf_ns.data.neus import NEUS_CAMERAS, NeuSDataParserConfig, validate_neus
from certsdf_ns.data.region import Region, check_cameras_see, region_box, region_from_cameras, region_to_dataparser_frame, tighten_to_points
from certsdf_ns.data.validation import (
    BACKGROUND_KEY,
    FOREGROUND_MASKS_KEY,
    REAL_CAPTURE_KEY,
    REGION_KEY,
    SplitReport,
    background_for_rgb_images,
    check_colmap_masks,
    colmap_model_dir,
    masks_carry_silhouettes,
    validate_colmap,
    validate_split,
)
from certsdf_ns.errors import CertSDFInputError, exit_cleanly

Format = Literal["blender", "nerfstudio", "neus", "colmap"]
# What each format needs, for the error on a folder certsdf cannot read.
FORMAT_FILES = {
    "blender": "Blender/NeRF-synthetic: transforms_train.json (+ transforms_val.json, transforms_test.json) "
    "and the PNG images their file_path entries name",
    "nerfstudio": "nerfstudio (ns-process-data, instant-ngp): transforms.json with fl_x, fl_y, cx, cy, w, h "
    "(optional k1 k2 p1 p2, per-frame mask_path) and the images it lists",
    "neus": f"NeuS/IDR (DTU, BlendedMVS): {NEUS_CAMERAS} (world_mat_i, scale_mat_i), image/ (or images/), "
    "optional mask/ (or masks/)",
    "colmap": "COLMAP: sparse/0/cameras.bin and sparse/0/images.bin (or .txt; points3D optional) and images/",
}


class DataFormatError(CertSDFInputError):
    """Input data that certsdf cannot use; the message names the file and what is wrong."""


def detect_format(data: Path) -> Format:
    """The first match of: transforms_train.json (blender), transforms.json (nerfstudio),
    cameras_sphere.npz (neus), a COLMAP model in sparse/0, colmap/sparse/0 or sparse (colmap).

    `data` must be a readable folder (or a nerfstudio transforms.json): anything else (a broken
    link, a device, a folder that cannot be listed) is refused here with what it is.
    """
    formats = "; ".join(f"{i}) {text}" for i, text in enumerate(FORMAT_FILES.values(), 1))
    if not data.exists():
        if data.is_symlink():
            raise DataFormatError(f"data path {data} is a broken symbolic link (to {os.readlink(data)}).")
        raise DataFormatError(
            f"data path {data} does not exist; --data must be a scene folder in one of these formats: {formats}."
        )
    if data.is_file():
        if data.suffix == ".json":
            return "nerfstudio"
        raise DataFormatError(f"data path {data} is a file; pass the scene folder.")
    if not data.is_dir():
        raise DataFormatError(f"data path {data} is neither a folder nor a file (a device, socket or pipe); pass the scene folder.")
    try:
        names = set(os.listdir(data))
        if not os.access(data, os.R_OK | os.X_OK):  # listable but not searchable: its files cannot be opened
            raise PermissionError(13, os.strerror(13))
    except OSError as err:
        raise DataFormatError(f"data folder {data} cannot be read ({err.strerror}); check its permissions.") from err
    if "transforms_train.json" in names:
        return "blender"
    if "transforms.json" in names:
        return "nerfstudio"
    if NEUS_CAMERAS in names:
        return "neus"
    if colmap_model_dir(data) is not None:
        return "colmap"
    if not names:
        raise DataFormatError(f"data folder {data} is empty.")
    found = ", ".join(sorted(p.name + ("/" if p.is_dir() else "") for p in data.iterdir())[:8])
    raise DataFormatError(
        f"{data} (holding {found}) matches none of the formats certsdf reads, so it cannot tell how to read it. "
        f"It needs: {formats}."
    )


def has_sparse_ply(data: Path) -> bool:
    """Whether a nerfstudio scene (folder or transforms.json) names a sparse point cloud that exists
    (`ply_file_path`, written by ns-process-data)."""
    meta_path = data if data.suffix == ".json" else data / "transforms.json"
    try:
        ply = json.loads(meta_path.read_text()).get("ply_file_path")
    except (OSError, ValueError, AttributeError):
        return False  # the input checks report what is wrong with the file
    return isinstance(ply, str) and (meta_path.parent / ply).is_file()


def load_preset(fmt: Format, preset_dir: Optional[Path] = None) -> Dict[str, Any]:
    """The dataset preset for a format (from `preset_dir`, or the presets shipped with the package when
    None); keys starting with '_' are comments."""
    path = resources.files("certsdf_ns.data_configs") if preset_dir is None else Path(preset_dir)
    preset = path / f"{fmt}.json"
    try:
        text = preset.read_text(encoding="utf-8")
    except OSError as err:
        raise DataFormatError(f"dataset preset {preset} cannot be read ({err.strerror or err}).") from err
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


class BlenderWithValFallback(Blender):
    """nerfstudio's Blender parser, evaluating on the test split when val is missing."""

    _warned = False

    def _generate_dataparser_outputs(self, split: str = "train") -> DataparserOutputs:
        if split == "val" and not (self.data / "transforms_val.json").exists():
            if not BlenderWithValFallback._warned:
                warn(f"{self.data / 'transforms_val.json'} is missing; evaluating on the test split.")
                BlenderWithValFallback._warned = True
            split = "test"
        return super()._generate_dataparser_outputs(split)


@dataclass
class BlenderWithValFallbackConfig(BlenderDataParserConfig):
    _target: Type = field(default_factory=lambda: BlenderWithValFallback)


@dataclass
class CertSDFDataParserConfig(DataParserConfig):
    """Format-detecting dataparser (Blender/NeRF-synthetic, nerfstudio, NeuS/IDR or COLMAP)."""

    _target: Type = field(default_factory=lambda: CertSDFDataParser)
    data: Path = Path("data/nerf_synthetic/lego")
    """Scene folder (or a nerfstudio transforms.json)."""
    format: Literal["auto", "blender", "nerfstudio", "neus", "colmap"] = "auto"
    """Input format; 'auto' detects it from the files present."""
    preset_dir: Optional[Path] = None
    """Folder of per-format presets (`blender.json`, `nerfstudio.json`, `neus.json`, `colmap.json`); None: the package's own."""
    eval_every: int = 8
    """NeuS/IDR and COLMAP: hold out every N-th view (0, N, 2N, …) for evaluation; 0: train and evaluate on all views."""
    region: Optional[Tuple[float, float, float, float]] = None
    """The object's ball CX CY CZ R in the scene's frame. None: NeuS's unit sphere; real captures: where the cameras look."""
    use_masks: bool = True
    """Use the scene's masks when it has them (NeuS/IDR mask/, transforms.json mask_path, COLMAP masks/)."""
    mask_role: Literal["auto", "object", "sampling"] = "auto"
    """'object': masks supervise the silhouette; 'sampling': rays only inside them; 'auto': 'object' for NeuS/IDR, else 'sampling'."""


class CertSDFDataParser(DataParser):
    """Delegates to nerfstudio's parser for the detected format, with certsdf's presets."""

    config: CertSDFDataParserConfig

    def __init__(self, config: CertSDFDataParserConfig) -> None:
        super().__init__(config)
        self._delegate: Optional[DataParser] = None
        self._scene_box: Optional[SceneBox] = None
        self._rgb_capture: Optional[Tuple[torch.Tensor, bool]] = None
        self._whole_scene_report: Optional[SplitReport] = None
        self.format: Optional[Format] = None
        self._region: Optional[Region] = None
        self._masks_usable: Optional[bool] = None

    def mask_role(self) -> Literal["object", "sampling"]:
        if self.config.mask_role != "auto":
            return self.config.mask_role
        return "object" if self.format == "neus" else "sampling"

    def delegate(self) -> DataParser:
        if self._delegate is None:
            data = Path(self.config.data)
            fmt: Format = detect_format(data) if self.config.format == "auto" else self.config.format
            preset = load_preset(fmt, self.config.preset_dir)
            self.format = fmt
            box = preset.pop("scene_box", None)
            if fmt == "blender":
                parser = BlenderWithValFallbackConfig(data=data, **preset).setup()
            elif fmt == "nerfstudio":
                # The sparse points of ns-process-data (ply_file_path) tighten the region; without that
                # file nerfstudio's loader would ask on the console whether to convert COLMAP's points.
                parser = NerfstudioDataParserConfig(data=data, load_3D_points=has_sparse_ply(data), **preset).setup()
            elif fmt == "neus":
                parser = NeuSDataParserConfig(data=data, eval_every=self.config.eval_every, **preset).setup()
            else:
                parser = self._colmap_config(data, preset).setup()
            self._scene_box = None if box is None else SceneBox(aabb=torch.tensor(box, dtype=torch.float32))
            log(f"{data}: {fmt} format")
            self._delegate = parser
        return self._delegate

    def _colmap_config(self, data: Path, preset: Dict[str, Any]) -> ColmapDataParserConfig:
        """nerfstudio's COLMAP parser on the model folder found by detection, split every `eval_every` views."""
        model_dir = colmap_model_dir(data)
        if model_dir is None:
            raise DataFormatError(f"{data} holds no COLMAP model; {FORMAT_FILES['colmap']}.")
        has_points = any((model_dir / f"points3D.{ext}").is_file() for ext in ("bin", "txt"))
        return ColmapDataParserConfig(
            data=data,
            colmap_path=model_dir.relative_to(data),
            # nerfstudio's default (True) raises when the model has no points3D; they are optional here.
            load_3D_points=has_points,
            masks_path=Path("masks") if (data / "masks").is_dir() else None,
            eval_mode="interval" if self.config.eval_every > 0 else "all",
            eval_interval=max(self.config.eval_every, 1),
            **preset,
        )

    def _validate(self, split: str) -> SplitReport:
        data = Path(self.config.data)
        sampling_masks = self.mask_role() == "sampling"
        if self.format in ("neus", "colmap", "nerfstudio") and self._whole_scene_report is not None:
            return self._whole_scene_report  # one camera file for every split: checked once
        if self.format == "neus":
            self._whole_scene_report = validate_neus(data, single_channel_masks=sampling_masks)
            return self._whole_scene_report
        if self.format == "colmap":
            parser = self.delegate()
            assert isinstance(parser.config, ColmapDataParserConfig)
            report = validate_colmap(data, data / parser.config.colmap_path, data / parser.config.images_path)
            if parser.config.masks_path is not None:
                check_colmap_masks(report, data / parser.config.masks_path, single_channel=sampling_masks)
            self._whole_scene_report = report
            return report
        assert self.format is not None
        report = validate_split(data, self.format, split, single_channel_masks=sampling_masks)
        if self.format == "nerfstudio":
            self._whole_scene_report = report  # transforms.json holds every split
        return report

    def _generate_dataparser_outputs(self, split: str = "train", **kwargs: Any) -> DataparserOutputs:
        # Every frame is checked before nerfstudio's parser sees it: bad data ends in one
        # paragraph naming the file and frame, not a traceback from deep inside nerfstudio.
        with exit_cleanly():
            parser = self.delegate()
            report = self._validate(split)
            if self._masks_usable is None and self.config.use_masks:
                self._masks_usable = masks_carry_silhouettes(report)  # the whole scene's masks, judged once
            outputs = parser.get_dataparser_outputs(split, **kwargs)
            if not report.has_alpha and self._rgb_capture is None:
                # Photographs of real scenes are known to be such from their format; Blender and
                # nerfstudio scenes without alpha are judged by their background.
                self._rgb_capture = background_for_rgb_images(report, real_capture=self.format in ("neus", "colmap"))
        if self._rgb_capture is not None:
            colour, real = self._rgb_capture
            # The model reads these from the train dataset's metadata (see validation.background_for_rgb_images).
            outputs.metadata[BACKGROUND_KEY] = colour
            outputs.metadata[REAL_CAPTURE_KEY] = real
        else:
            outputs.metadata[REAL_CAPTURE_KEY] = False
        if not self.config.use_masks or self._masks_usable is False:
            outputs.mask_filenames = None
            outputs.metadata.pop(FOREGROUND_MASKS_KEY, None)
        if outputs.mask_filenames is not None:
            outputs.metadata[FOREGROUND_MASKS_KEY] = self.mask_role() == "object"
        if self._scene_box is not None:
            outputs.scene_box = self._scene_box
        region = self.region(outputs, split)
        if region is not None:
            centre, radius = region
            outputs.scene_box = SceneBox(aabb=region_box(region))
            outputs.metadata[REGION_KEY] = torch.cat([centre, torch.tensor([radius])])
        return outputs

    def region(self, outputs: DataparserOutputs, split: str) -> Optional[Region]:
        """The object's region in the dataparser's frame (None: the whole scene box, no background),
        the same for every split: derived once, from the training cameras."""
        if self._region is not None:
            return self._region
        real = bool(outputs.metadata.get(REAL_CAPTURE_KEY))
        if self.config.region is not None:
            if not self.config.region[3] > 0:
                with exit_cleanly():
                    raise CertSDFInputError(
                        f"--pipeline.datamanager.dataparser.region: the radius must be positive, got {self.config.region[3]}."
                    )
            region = region_to_dataparser_frame(self.config.region, outputs.dataparser_transform, outputs.dataparser_scale)
            why = "set by --pipeline.datamanager.dataparser.region"
        elif self.format == "neus":
            region, why = (torch.zeros(3), 1.0), "NeuS's unit sphere"
        elif real:
            train = outputs if split == "train" else self.delegate().get_dataparser_outputs("train")
            region, why = region_from_cameras(train.cameras), "the ball the training cameras look at"
            with exit_cleanly():
                check_cameras_see(region, train.cameras, train.image_filenames, Path(self.config.data))
            points = train.metadata.get("points3D_xyz")
            if points is not None:
                tightened = tighten_to_points(region, points)
                if tightened[1] < region[1]:
                    why += f", tightened from radius {region[1]:.3f} to the {len(points)} sparse points"
                    region = tightened
        else:
            return None
        centre, radius = region
        log(
            f"region of interest: ball at ({', '.join(f'{c:.3f}' for c in centre.tolist())}), radius {radius:.3f} "
            f"in the dataparser's frame ({why}); the certified grid covers its box"
            + ("; outside it, a background model." if real else ".")
            + " Change with --pipeline.datamanager.dataparser.region CX CY CZ R (the scene's own frame)."
        )
        self._region = region
        return region
