"""A trained run on disk, loaded the one way every reader loads it.

    run = load_run("outputs/EXP/certsdf/TS/config.yml")          # newest checkpoint; step=N for another
    run.model.field.geometry                                      # the certified grid as the model had it
    transform, scale = run.frame()                                # x_model = scale·(transform·[x; 1])

`certsdf-export`, the query API (`CertifiedSDF.from_checkpoint`), the demo and the bench all come
through :func:`load_run`. It rebuilds the pipeline with nerfstudio's own `eval_setup` from the run's
config.yml (no images are loaded unless asked for), so the grid is exactly the model's: σ at the
checkpoint's step (the model's schedule, `CertSDFModel.update_to_step`), the region ball of a real
capture (from the dataparser, as in training) and the run's frame. Run folders moved or copied after
training still load: the checkpoints next to config.yml win over the absolute path it records.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Tuple

import numpy as np
import yaml

from certsdf_ns.errors import CertSDFInputError
from certsdf_ns.training.run_folder import check_checkpoint_folder, step_of

FRAME_FILE = "dataparser_transforms.json"


@dataclass
class LoadedRun:
    """A run rebuilt from disk with one of its checkpoints loaded."""

    config: Any
    """The run's TrainerConfig (as eval_setup resolved it)."""
    pipeline: Any
    """nerfstudio pipeline with the checkpoint's weights."""
    checkpoint: Path
    """The checkpoint file that was loaded."""
    step: int
    """Its training step."""
    run_dir: Path
    """The folder holding config.yml."""

    @property
    def model(self):
        return self.pipeline.model

    def frame(self) -> Tuple[np.ndarray, float]:
        """(3×4 transform, scale) that took the scene's original frame to the model's (see :func:`read_frame`)."""
        return read_frame(self.run_dir)


def read_run_config(config_path: Path, method: Optional[str] = "certsdf"):
    """The run's config.yml as nerfstudio's TrainerConfig, checked to be a run of `method` (None: any)
    whose scene is still there; CertSDFInputError naming the file otherwise."""
    config_path = Path(config_path)
    if not config_path.is_file():
        raise CertSDFInputError(f"{config_path}: no such file (pass the config.yml of an ns-train run)")
    try:
        config = yaml.load(config_path.read_text(), Loader=yaml.Loader)
    except yaml.YAMLError as exc:
        raise CertSDFInputError(f"{config_path}: not a readable YAML config ({exc.__class__.__name__})") from exc
    found = getattr(config, "method_name", None)
    if method is not None and found != method:
        raise CertSDFInputError(f"{config_path}: method is {found or type(config).__name__!r}, not {method}")
    data = Path(config.pipeline.datamanager.dataparser.data)
    if not data.exists():
        raise CertSDFInputError(f"{config_path}: the scene {data} it was trained on is missing (its cameras and box are needed)")
    return config


def checkpoint_folder(config, run_dir: Path) -> Path:
    """The run's checkpoint folder: next to config.yml when it is there (the run folder was moved or
    copied; ns-train records absolute paths), else where the config says."""
    local = Path(run_dir) / config.relative_model_dir
    return local if local.is_dir() else Path(config.get_checkpoint_dir())


def read_frame(run_dir: Path) -> Tuple[np.ndarray, float]:
    """(3×4 transform, scale) that nerfstudio applied to the poses, x_model = scale·(T·[x; 1]), from the
    run's dataparser_transforms.json (the identity for Blender scenes)."""
    path = Path(run_dir) / FRAME_FILE
    try:
        data = json.loads(path.read_text())
        transform, scale = np.asarray(data["transform"], dtype=np.float64), float(data["scale"])
    except FileNotFoundError as exc:
        raise CertSDFInputError(f"{path} is missing: the run's frame is unknown (use the model's frame instead)") from exc
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CertSDFInputError(f"{path}: unreadable ({exc.__class__.__name__}: {exc})") from exc
    if transform.shape != (3, 4) or not np.isfinite(transform).all():
        raise CertSDFInputError(f"{path}: 'transform' must be a finite 3x4 matrix, got shape {transform.shape}")
    if not np.isfinite(scale) or scale <= 0:
        raise CertSDFInputError(f"{path}: 'scale' must be a positive number, got {data['scale']}")
    return transform, scale


def load_run(
    config_path: Path,
    step: Optional[int] = None,
    test_mode: Literal["inference", "test", "val"] = "inference",
    method: Optional[str] = "certsdf",
) -> LoadedRun:
    """The run of `config_path` with checkpoint `step` (None: the newest) loaded.

    `test_mode` is eval_setup's: "inference" loads no images; "test" also loads the evaluation split's
    images (for metrics). `method` None accepts any nerfstudio method (the bench's peers).
    """
    config_path = Path(config_path)
    config = read_run_config(config_path, method)
    run_dir = config_path.resolve().parent
    folder = checkpoint_folder(config, run_dir)
    checkpoints = check_checkpoint_folder(folder)
    if step is not None and not any(step_of(p) == step for p in checkpoints):
        have = ", ".join(str(step_of(p)) for p in checkpoints)
        raise CertSDFInputError(f"{folder} holds no checkpoint of step {step} (it has steps {have}).")
    from nerfstudio.utils.eval_utils import eval_setup  # slow (discovers every method): after the checks

    def from_this_folder(cfg):
        cfg.get_checkpoint_dir = lambda: folder
        cfg.load_step = step
        return cfg

    config, pipeline, checkpoint, loaded = eval_setup(config_path, test_mode=test_mode, update_config_callback=from_this_folder)
    return LoadedRun(config, pipeline, Path(checkpoint), int(loaded), run_dir)
