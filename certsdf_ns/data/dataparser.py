"""A dataparser that detects Blender/NeRF-synthetic and nerfstudio formats.

`ns-train certsdf --data DIR` takes no dataparser subcommand: this parser looks at DIR,
picks nerfstudio's own Blender or Nerfstudio parser, and applies the matching preset from
`data_configs/`. It also fixes one trap of nerfstudio's Blender parser: trimmed copies of
NeRF-synthetic often lack `transforms_val.json`, and evaluation then falls back to the
test split (with one warning) instead of raising FileNotFoundError.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Literal, Optional, Type

import torch

from nerfstudio.data.dataparsers.base_dataparser import DataParser, DataParserConfig, DataparserOutputs
from nerfstudio.data.dataparsers.blender_dataparser import Blender, BlenderDataParserConfig
from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig
from nerfstudio.data.scene_box import SceneBox

from certsdf_ns.console import log, warn
from certsdf_ns.data.validation import BACKGROUND_KEY, background_for_rgb_images, validate_split
from certsdf_ns.errors import CertSDFInputError, exit_cleanly

PRESET_DIR = Path(__file__).resolve().parents[2] / "data_configs"
Format = Literal["blender", "nerfstudio"]


class DataFormatError(CertSDFInputError):
    """Input data that certsdf cannot use; the message names the file and what is wrong."""


def detect_format(data: Path) -> Format:
    """Blender if `transforms_train.json` is there, nerfstudio if `transforms.json` is.

    `data` must be a readable folder (or a nerfstudio transforms.json): anything else (a broken
    link, a device, a folder that cannot be listed) is refused here with what it is.
    """
    if not data.exists():
        if data.is_symlink():
            raise DataFormatError(f"data path {data} is a broken symbolic link (to {os.readlink(data)}).")
        raise DataFormatError(
            f"data path {data} does not exist; --data must be a scene folder holding transforms_train.json "
            "(Blender/NeRF-synthetic) or transforms.json (nerfstudio format)."
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
    if not names:
        raise DataFormatError(f"data folder {data} is empty.")
    raise DataFormatError(
        f"{data} holds neither transforms_train.json (Blender/NeRF-synthetic) nor transforms.json "
        "(nerfstudio format); certsdf cannot tell how to read it."
    )


def load_preset(fmt: Format, preset_dir: Path = PRESET_DIR) -> Dict[str, Any]:
    """The dataset preset for a format; keys starting with '_' are comments."""
    path = preset_dir / f"{fmt}.json"
    with open(path, encoding="utf-8") as f:
        return {k: v for k, v in json.load(f).items() if not k.startswith("_")}


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
    """Format-detecting dataparser (Blender/NeRF-synthetic or nerfstudio)."""

    _target: Type = field(default_factory=lambda: CertSDFDataParser)
    data: Path = Path("data/nerf_synthetic/lego")
    """Scene folder (or a nerfstudio transforms.json)."""
    format: Literal["auto", "blender", "nerfstudio"] = "auto"
    """Input format; 'auto' detects it from the files present."""
    preset_dir: Path = PRESET_DIR
    """Folder of per-format presets (`blender.json`, `nerfstudio.json`)."""


class CertSDFDataParser(DataParser):
    """Delegates to nerfstudio's parser for the detected format, with certsdf's presets."""

    config: CertSDFDataParserConfig

    def __init__(self, config: CertSDFDataParserConfig) -> None:
        super().__init__(config)
        self._delegate: Optional[DataParser] = None
        self.format: Optional[Format] = None

    def delegate(self) -> DataParser:
        if self._delegate is None:
            data = Path(self.config.data)
            fmt: Format = detect_format(data) if self.config.format == "auto" else self.config.format
            preset = load_preset(fmt, self.config.preset_dir)
            self.format = fmt
            if fmt == "blender":
                box = preset.pop("scene_box", None)
                parser = BlenderWithValFallbackConfig(data=data, **preset).setup()
                self._scene_box = None if box is None else SceneBox(aabb=torch.tensor(box, dtype=torch.float32))
            else:
                parser = NerfstudioDataParserConfig(data=data, **preset).setup()
                self._scene_box = None
            log(f"{data}: {fmt} format")
            self._delegate = parser
        return self._delegate

    def _generate_dataparser_outputs(self, split: str = "train", **kwargs: Any) -> DataparserOutputs:
        # Every frame is checked before nerfstudio's parser sees it: bad data ends in one
        # paragraph naming the file and frame, not a traceback from deep inside nerfstudio.
        with exit_cleanly():
            parser = self.delegate()
            assert self.format is not None
            report = validate_split(Path(self.config.data), self.format, split)
        outputs = parser.get_dataparser_outputs(split, **kwargs)
        if split == "train" and not report.has_alpha:
            # The model reads this from the train dataset's metadata (see validation.background_for_rgb_images).
            outputs.metadata[BACKGROUND_KEY] = background_for_rgb_images(report)
        if self._scene_box is not None:
            outputs.scene_box = self._scene_box
        return outputs
