"""nerfstudio's VanillaDataManager with a dataset that delivers object masks without restricting sampling.

nerfstudio's `mask` key means "sample rays only here": when a batch holds `mask`, its
PixelSampler draws every ray inside it (`pixel_samplers.py`, `sample_method`), and its
InputDataset reads masks as single-channel booleans. An object mask (NeuS/IDR's `mask/`,
white = object) is supervision instead: the foreground's accumulation must be 1 inside and 0
outside, so rays are needed on both sides (as the alpha of RGBA images gives on synthetic
data). When the dataparser marks its `mask_filenames` as object masks
(:data:`FOREGROUND_MASKS_KEY`), :class:`CertSDFDataset` reads them itself, as grey levels in
[0, 1] (DTU's half-resolution masks are RGB with anti-aliased edges), and returns them under
:data:`MASK_BATCH_KEY` instead of `mask`. nerfstudio's pixel sampler then samples everywhere
and gathers that key per ray like any other image-shaped entry; evaluation gets it as
[H, W, 1]. Masks that are not marked keep nerfstudio's meaning (`mask`, sampling inside only).
"""

from __future__ import annotations

import dataclasses
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Type

import numpy as np
import torch
from jaxtyping import Float
from PIL import Image
from torch import Tensor

from nerfstudio.data.datamanagers.base_datamanager import VanillaDataManager, VanillaDataManagerConfig
from nerfstudio.data.dataparsers.base_dataparser import DataparserOutputs
from nerfstudio.data.datasets.base_dataset import InputDataset

from certsdf_ns.data.dataparser import CertSDFDataParserConfig
from certsdf_ns.data.validation import FOREGROUND_MASKS_KEY, MASK_BATCH_KEY


def load_object_mask(path, scale_factor: float = 1.0) -> Float[Tensor, "H W 1"]:
    """Grey level of a mask image in [0, 1] (any mode: L, RGB, RGBA's colour), resized like its image."""
    with Image.open(path) as im:
        grey = im.convert("L")
        if scale_factor != 1.0:
            w, h = grey.size
            # Same size rule as InputDataset.get_numpy_image; bilinear keeps edges soft like the images'.
            grey = grey.resize((int(w * scale_factor), int(h * scale_factor)), resample=Image.Resampling.BILINEAR)
        return torch.from_numpy(np.asarray(grey, dtype=np.float32) / 255.0)[..., None]


class CertSDFDataset(InputDataset):
    """InputDataset that returns object masks as :data:`MASK_BATCH_KEY` (see the module docstring)."""

    exclude_batch_keys_from_device: List[str] = InputDataset.exclude_batch_keys_from_device + [MASK_BATCH_KEY]

    def __init__(self, dataparser_outputs: DataparserOutputs, scale_factor: float = 1.0):
        self.object_mask_filenames: Optional[List] = None
        if dataparser_outputs.metadata.get(FOREGROUND_MASKS_KEY) and dataparser_outputs.mask_filenames is not None:
            self.object_mask_filenames = list(dataparser_outputs.mask_filenames)
            # Hidden from InputDataset so that it neither loads them as `mask` nor restricts sampling.
            dataparser_outputs = dataclasses.replace(dataparser_outputs, mask_filenames=None)
        super().__init__(dataparser_outputs, scale_factor)

    def get_metadata(self, data: Dict) -> Dict:
        if self.object_mask_filenames is None:
            return {}
        mask = load_object_mask(self.object_mask_filenames[data["image_idx"]], self.scale_factor)
        if mask.shape[:2] != data["image"].shape[:2]:
            raise ValueError(
                f"mask {self.object_mask_filenames[data['image_idx']]} is {tuple(mask.shape[:2])} but its image is "
                f"{tuple(data['image'].shape[:2])} (height, width)"
            )
        return {MASK_BATCH_KEY: mask}


@contextmanager
def _unused_workers_unannounced() -> Iterator[None]:
    """nerfstudio builds its CacheDataloaders with 4 workers per device, and torch warns when the
    machine allows fewer; but a CacheDataloader never starts them (its own ``__iter__`` serves
    batches it loads with a thread pool sized to the machine). That one warning is hidden, by its
    message, while the loaders are built."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"This DataLoader will create \d+ worker processes in total", UserWarning)
        yield


class CertSDFDataManager(VanillaDataManager[CertSDFDataset]):
    """VanillaDataManager over :class:`CertSDFDataset`."""

    def setup_train(self) -> None:
        with _unused_workers_unannounced():
            super().setup_train()

    def setup_eval(self) -> None:
        with _unused_workers_unannounced():
            super().setup_eval()


@dataclass
class CertSDFDataManagerConfig(VanillaDataManagerConfig):
    """nerfstudio's VanillaDataManagerConfig, building a :class:`CertSDFDataManager`."""

    _target: Type = field(default_factory=lambda: CertSDFDataManager)
    dataparser: CertSDFDataParserConfig = field(default_factory=CertSDFDataParserConfig)  # type: ignore[assignment]
    """certsdf's format-detecting dataparser (one type, so its options are plain flags, no subcommand)."""
