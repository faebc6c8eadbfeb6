"""`certsdf-bench real`: certsdf against nerfacto on real captures (DTU scan 65, fruit, cup).

The full run (about an hour of training plus evaluation per method and scene on one core)::

    export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
    taskset -c 1 certsdf-bench real --scene-names dtu_masks dtu_nomasks fruit cup --methods certsdf nerfacto \\
      --budget-s 900 --trial.eval-points 3 --results-dir bench_results/real

It writes `RESULTS_DIR/real/<method>_<scene>.json` per run, `suite.json` (machine, configuration,
table rows), `summary.md` and `summary.csv` (one table per scene), `<scene>_psnr.png` (and, on DTU,
`<scene>_silhouette.png`), and `pictures/<scene>_<mesh>_step<N>.png`: each mesh seen from one
held-out camera, beside the photograph. Converted data go to `RESULTS_DIR/real/data/`, training
runs to `RESULTS_DIR/real/runs/` (checkpoints deleted once evaluated; the last certsdf mesh of
each run is kept as a PLY). A results folder that already holds trained runs is refused.

Scenes (`--scene-names`), from `../shared/data/real/` (`--data.dtu`, `--data.fruit`, `--data.cup`
point elsewhere; see `../shared/data/README.md`), all trained and evaluated at
`camera-res-scale-factor` 0.5 (`--scale`) for both methods, to keep CPU runs affordable
(DTU 400×300, fruit 302×403, cup 400×300):

- `dtu_masks`: DTU scan 65 (NeuS/IDR layout), views 0, 8, …, 48 held out (certsdf's NeuS
  parser; its `get_dataparser_outputs("test")`). certsdf trains with the object masks (its
  default on NeuS data: they supervise the accumulation). nerfacto trains with the same masks the
  nerfstudio way: `mask_path` per frame, single-channel PNG, which makes nerfstudio's pixel sampler
  draw rays inside the mask only. Its masks are binarised at grey level 0.5 (nerfstudio reads any
  non-zero value as "inside"), the threshold the evaluation uses.
- `dtu_nomasks`: the same without masks for both (certsdf: `--pipeline.datamanager.dataparser.use-masks
  False`). Evaluation still has the masks (every DTU view has one): PSNR inside them and silhouettes.
- `fruit` (transforms.json with lens distortion), `cup` (COLMAP `sparse/0`): each method's own
  nerfstudio parser: certsdf `--data DIR`; nerfacto `nerfstudio-data` / `colmap` with the options
  of certsdf's presets (`data_configs/nerfstudio.json`, `data_configs/colmap.json`; for COLMAP also
  the interval split of every 8th view, the model folder found by certsdf's detection and
  `load_3D_points` only when points3D exists), so that both get the same poses and split.

The flags per scene are in :data:`SCENES` (`certsdf_args`: ns-train options of certsdf;
`nerfacto_dataparser_args`: options after nerfacto's dataparser subcommand);
`--scene-args 'SCENE:METHOD:--opt value ...'` appends more at run time.

Same cameras and images. nerfacto cannot read the NeuS layout, so DTU is converted once into a
nerfstudio `transforms.json` in certsdf's unit-sphere frame (:func:`dtu_to_nerfstudio`: the
cameras of certsdf's NeuS parser, per-frame intrinsics, images symlinked, the split written as
`train/val/test_filenames`), and nerfacto reads it with `nerfstudio-data --orientation-method none
--center-method none --auto-scale-poses False --scale-factor 1.0 --scene-scale 1.0
--downscale-factor 1`, so its world frame is certsdf's. Before any training, each method's exact
ns-train command line is parsed with ns-train's own parser, its dataparser is built and its
held-out outputs are compared with certsdf's (:func:`check_heldout_cameras`): the same image
files, camera_to_worlds and intrinsics within 1e-4, the same masks used or not; a mismatch stops
the suite. Every method is then rendered from certsdf's held-out cameras and scored on the same
images (:func:`certsdf_ns.bench.evaluate.heldout_metrics`).

nerfacto settings (:class:`certsdf_ns.bench.methods.NerfactoRealSpec`): nerfstudio's nerfacto
defaults for unbounded real scenes (scene contraction on, near 0.05 / far 1000, its proposal
sampler, appearance embedding, 'last_sample' background), because that is how nerfacto is meant to
be run on photographs; the camera optimiser off, so both methods keep the same poses (and the
held-out cameras stay valid); `--pipeline.model.implementation torch` (no tinycudann on CPU);
fp32 on CPU, 4096 rays per batch and the same camera-res-scale-factor for both methods
(:class:`certsdf_ns.bench.methods.TrainSettings`). certsdf runs with its defaults.

Per method and scene, at the evaluated checkpoints (log-spaced in training time,
`--trial.eval-points`, plus the first checkpoint, as in the other suites):

1. held-out images: every held-out view (`--trial.n-test-views 0`, the default here; N > 0 keeps
   the first N) rendered with `pipeline.model.get_outputs_for_camera`: PSNR over the whole image,
   PSNR inside the object mask (DTU), SSIM, render seconds per view;
2. meshes: certsdf's certified grid as `certsdf-export` meshes it, restricted to observed space
   (:func:`certsdf_ns.export.observed.export_mesh`, in the dataparser frame; what that removed under
   `observed_space`) at every evaluated checkpoint; nerfacto's `ns-export tsdf` and `ns-export
   poisson` once, at the last checkpoint (minutes each on CPU), inside certsdf's scene box (the
   unit sphere's box on DTU; the region of interest on fruit and cup), in nerfacto's dataparser
   frame, which is certsdf's by construction;
3. DTU: each mesh ray-cast from every held-out camera (:func:`certsdf_ns.bench.meshes.silhouette_scores`):
   silhouette IoU |hit ∧ M| / |hit ∨ M| and coverage |hit ∧ M| / |M| against the object mask M
   (> 0.5), per view and their mean; every scene: a picture of each mesh from held-out view 8
   (DTU) or the first held-out view (fruit, cup);
4. minutes to the first usable mesh: the training time of the first evaluated checkpoint at which
   certsdf's mesh reaches silhouette IoU ≥ 0.9 (dtu_masks) or coverage ≥ 0.9 (dtu_nomasks, where
   the mesh also holds whatever background lies inside the unit sphere's box, so IoU would
   measure the background; `--usable-threshold`).
"""

from __future__ import annotations

import gc
import json
import math
import shlex
import time
import traceback
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Dict, List, Literal, Optional, Sequence, Tuple

import numpy as np
import torch
import trimesh

from nerfstudio.utils.rich_utils import CONSOLE

from certsdf_ns.bench.data import SHARED, Scene
from certsdf_ns.bench.evaluate import HeldOutViews, heldout_metrics, heldout_views, iter_checkpoints
from certsdf_ns.bench.meshes import MeshResult, PeerExportOptions, mesh_picture, peer_mesh, silhouette_scores
from certsdf_ns.bench.methods import MethodSpec, NerfactoRealSpec, TrainSettings, get_method
from certsdf_ns.bench.offline import CHECKPOINT_NOTE, LPIPS_NOTE
from certsdf_ns.bench.report import real_rows, write_summary
from certsdf_ns.bench.results import plot_real, write_csv, write_json
from certsdf_ns.bench.runner import RunResult
from certsdf_ns.bench.suites import BenchConfig, _header, _run_all, refuse_earlier_trials
from certsdf_ns.bench.trial import TrialOptions, TrialRequest, train_and_evaluate
from certsdf_ns.export.mesh import NoSurfaceError
from certsdf_ns.export.observed import export_mesh

REAL = SHARED / "real"
CAMERA_TOLERANCE = 1e-4
"""Largest |difference| allowed between two methods' held-out camera_to_worlds and intrinsics (px)."""
NEUS_AS_NERFSTUDIO = (
    "--orientation-method", "none", "--center-method", "none", "--auto-scale-poses", "False",
    "--scale-factor", "1.0", "--scene-scale", "1.0", "--downscale-factor", "1",
)  # fmt: skip
"""nerfstudio-data options that keep the converted DTU cameras in certsdf's unit-sphere frame."""
GT_ONLY_MESH_KEYS = ("chamfer_l1", "fscore", "normal_consistency", "offset_median", "offset_mean")
"""MeshResult fields that need a ground-truth mesh (none on real captures)."""


@dataclass(frozen=True)
class RealScene:
    """One scene variant of the suite: which capture, and each method's flags on it."""

    name: str
    source: Literal["dtu", "fruit", "cup"]
    """Which capture (a field of :class:`RealDataOptions`)."""
    fmt: Literal["neus", "nerfstudio", "colmap"]
    masks: bool = False
    """Both methods train with the capture's object masks."""
    certsdf_args: Tuple[str, ...] = ()
    """ns-train options of certsdf on this scene."""
    nerfacto_dataparser_args: Tuple[str, ...] = ()
    """Options appended after nerfacto's dataparser subcommand (and the ones derived from certsdf's preset)."""
    picture_view: Optional[str] = None
    """Held-out view of the mesh pictures (its label); None: the first held-out view."""
    usable_metric: Optional[Literal["iou", "coverage"]] = None
    """The silhouette score that defines "the first usable mesh" (None: not measured)."""


SCENES: Dict[str, RealScene] = {
    s.name: s
    for s in (
        RealScene("dtu_masks", "dtu", "neus", masks=True, picture_view="8", usable_metric="iou"),
        RealScene("dtu_nomasks", "dtu", "neus", masks=False, picture_view="8", usable_metric="coverage",
                  certsdf_args=("--pipeline.datamanager.dataparser.use-masks", "False")),  # fmt: skip
        RealScene("fruit", "fruit", "nerfstudio"),
        RealScene("cup", "cup", "colmap"),
    )
}


@dataclass
class RealDataOptions:
    """Where the captures are (read-only; converted copies go to RESULTS_DIR/real/data)."""

    dtu: Path = REAL / "dtu_scan65"
    """NeuS/IDR folder: cameras_sphere.npz, image/, mask/."""
    fruit: Path = REAL / "fruit"
    """nerfstudio folder: transforms.json and its images."""
    cup: Path = REAL / "cup_colmap"
    """COLMAP folder: images/ and sparse/0."""


@dataclass
class RealConfig(BenchConfig):
    """certsdf vs nerfacto on real captures: held-out PSNR/SSIM, mesh silhouettes, mesh pictures."""

    scene_names: Tuple[str, ...] = tuple(SCENES)
    """Scene variants: dtu_masks, dtu_nomasks, fruit, cup (see the module docstring)."""
    methods: Tuple[str, ...] = ("certsdf", "nerfacto")
    """Methods to compare."""
    budget_s: float = 900.0
    """Training seconds per method and scene."""
    scale: float = 0.5
    """camera-res-scale-factor of both methods and of the evaluation (0.5: DTU at 400x300)."""
    data: RealDataOptions = field(default_factory=RealDataOptions)
    """Where the captures are."""
    scene_args: Tuple[str, ...] = ()
    """More flags per scene and method, as 'SCENE:METHOD:--opt value ...' (nerfacto: its dataparser's options)."""
    peer_exports: bool = True
    """Extract nerfacto's meshes (ns-export tsdf and poisson) at its last checkpoint."""
    export: PeerExportOptions = field(default_factory=PeerExportOptions)
    """nerfacto's ns-export settings; the box is certsdf's scene box on each scene (--export.bbox is not used)."""
    peer_last_only: bool = True
    """Evaluate peers (nerfacto) at their last checkpoint only; certsdf is evaluated along its curve."""
    usable_threshold: float = 0.9
    """A certsdf mesh is usable from the first checkpoint whose IoU (dtu_masks) / coverage (dtu_nomasks) ≥ this."""
    trial: TrialOptions = field(default_factory=lambda: TrialOptions(n_test_views=0))
    """As in the other suites; here --trial.n-test-views 0 (the default) renders every held-out view."""


@dataclass
class RealRequest(TrialRequest):
    """A trial on a real capture: `scene.path` is the data folder this method reads."""

    real: Optional[RealScene] = None
    views: Optional[HeldOutViews] = None
    """The held-out views every method is scored on (certsdf's cameras and images)."""
    camera_check: dict = field(default_factory=dict)
    """What :func:`check_heldout_cameras` measured for this method."""
    mesh_box: Optional[List[List[float]]] = None
    """[min xyz, max xyz] of certsdf's scene box in the dataparser frame: where peer meshes are extracted."""
    usable_threshold: float = 0.9
    peer_last_only: bool = True
    """Evaluate a peer at its last checkpoint only (RealConfig.peer_last_only)."""


class CameraMismatchError(AssertionError):
    """Two methods would be evaluated on different held-out cameras or images."""


# --------------------------------------------------------------------------- DTU -> transforms.json


def dtu_to_nerfstudio(src: Path, out: Path, masks: bool, eval_every: int = 8) -> Path:
    """Write `out/transforms.json`: certsdf's NeuS cameras of `src` (unit-sphere frame) as a nerfstudio scene.

    Per frame: `fl_x fl_y cx cy w h` (nerfstudio's pixel-centre convention, as certsdf's NeuS parser
    gives them) and the 4×4 `transform_matrix` (OpenGL axes); `image/` holds symlinks to the
    source images; with `masks`, `mask/` holds the object masks as single-channel 0/255 PNGs
    (grey level > 0.5) named in `mask_path`. `train_filenames`, `val_filenames` and `test_filenames`
    fix the split to the NeuS parser's (every `eval_every`-th view held out). Read it with
    :data:`NEUS_AS_NERFSTUDIO`; nothing is reoriented, recentred or rescaled.
    """
    from PIL import Image

    from certsdf_ns.data.neus import NeuSDataParserConfig, read_layout

    layout = read_layout(Path(src))
    parser = NeuSDataParserConfig(data=Path(src), eval_every=eval_every).setup()
    (out / "image").mkdir(parents=True, exist_ok=True)
    if masks:
        if layout.masks is None:
            raise ValueError(f"{src} has no mask folder; the masked variant needs one")
        (out / "mask").mkdir(exist_ok=True)
    index = {p.resolve(): i for i, p in enumerate(layout.images)}
    frames, splits = {}, {}
    for split in ("train", "test"):
        outputs = parser.get_dataparser_outputs(split)
        cams = outputs.cameras
        names = []
        for j, path in enumerate(outputs.image_filenames):
            i = index[Path(path).resolve()]
            name = f"image/{layout.images[i].name}"
            names.append(name)
            link = out / name
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(layout.images[i].resolve())
            c2w = np.eye(4)
            c2w[:3] = cams.camera_to_worlds[j].double().numpy()
            frame = {"file_path": name, "transform_matrix": c2w.tolist(),
                     "fl_x": float(cams.fx[j, 0]), "fl_y": float(cams.fy[j, 0]),
                     "cx": float(cams.cx[j, 0]), "cy": float(cams.cy[j, 0]),
                     "w": int(cams.width[j, 0]), "h": int(cams.height[j, 0])}  # fmt: skip
            if masks:
                assert layout.masks is not None
                mask_name = f"mask/{layout.images[i].stem}.png"
                with Image.open(layout.masks[i]) as im:
                    grey = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
                Image.fromarray(np.where(grey > 0.5, 255, 0).astype(np.uint8), mode="L").save(out / mask_name)
                frame["mask_path"] = mask_name
            frames[name] = frame
        splits[split] = names
    meta = {
        "_comment": f"{src} (NeuS/IDR) in certsdf's unit-sphere frame, written by certsdf_ns.bench.real.dtu_to_nerfstudio; "
        f"read with nerfstudio-data {' '.join(NEUS_AS_NERFSTUDIO)}",
        "frames": [frames[k] for k in sorted(frames)],
        "train_filenames": splits["train"],
        "val_filenames": splits["test"],
        "test_filenames": splits["test"],
    }
    (out / "transforms.json").write_text(json.dumps(meta, indent=1))
    return out


# --------------------------------------------------------------------------- per-scene flags


def _preset_flags(fmt: str) -> List[str]:
    """certsdf's preset for a nerfstudio-read format, as options of nerfstudio's own dataparser."""
    from certsdf_ns.data.dataparser import load_preset

    flags: List[str] = []
    for key, value in load_preset(fmt).items():
        if key == "scene_box":  # certsdf's own (Blender) box, not a nerfstudio option
            continue
        flags += [f"--{key.replace('_', '-')}", str(value)]
    return flags


def nerfacto_dataparser(scene: RealScene, source: Path, eval_every: int = 8) -> List[str]:
    """nerfacto's dataparser subcommand and options on a scene (before `--scene-args` additions)."""
    if scene.fmt == "neus":
        return ["nerfstudio-data", *NEUS_AS_NERFSTUDIO, *scene.nerfacto_dataparser_args]
    if scene.fmt == "nerfstudio":
        return ["nerfstudio-data", *_preset_flags("nerfstudio"), *scene.nerfacto_dataparser_args]
    from certsdf_ns.data.validation import colmap_model_dir

    model = colmap_model_dir(source)
    if model is None:
        raise ValueError(f"{source} holds no COLMAP model (sparse/0/cameras.bin, ...)")
    points = any((model / f"points3D.{ext}").is_file() for ext in ("bin", "txt"))
    args = ["colmap", *_preset_flags("colmap"), "--colmap-path", str(model.relative_to(source)),
            "--load-3D-points", str(points), "--eval-mode", "interval", "--eval-interval", str(eval_every)]  # fmt: skip
    if (source / "masks").is_dir():
        args += ["--masks-path", "masks"]
    return [*args, *scene.nerfacto_dataparser_args]


def _scene_args(items: Sequence[str], scene: str, method: str) -> List[str]:
    out: List[str] = []
    for item in items:
        parts = item.split(":", 2)
        if len(parts) != 3:
            raise ValueError(f"--scene-args {item!r}: expected 'SCENE:METHOD:--opt value ...'")
        if parts[0] == scene and parts[1] == method:
            out += shlex.split(parts[2])
    return out


def real_spec(name: str, scene: RealScene, source: Path, trial_args: Sequence[str], extra: Sequence[str]) -> MethodSpec:
    """The method's spec on a scene: certsdf gets the scene's ns-train flags, nerfacto its dataparser."""
    if name == "certsdf":
        return get_method(name, [*scene.certsdf_args, *trial_args, *extra], real=True)
    spec = get_method(name, list(trial_args), real=True)
    if isinstance(spec, NerfactoRealSpec):
        spec.dataparser = [*nerfacto_dataparser(scene, source), *extra]
    return spec


# --------------------------------------------------------------------------- same cameras for every method


@lru_cache(maxsize=1)
def _method_union():
    from nerfstudio.configs.method_configs import AnnotatedBaseConfigUnion

    return AnnotatedBaseConfigUnion


def heldout_outputs(spec: MethodSpec, data: Path, settings: TrainSettings, split: str = "test"):
    """The dataparser outputs a method's ns-train command line gives: parsed by ns-train's own tyro
    parser, `--data` handled as ns-train and the datamanagers do."""
    import tyro

    config = tyro.cli(_method_union(), args=[spec.ns_method, *spec.train_args(data, settings)])
    dm = config.pipeline.datamanager
    if config.data is not None:  # ns-train's --data alias
        dm.data = config.data
    if getattr(dm, "data", None) is not None:
        dm.dataparser.data = Path(dm.data)
    return dm.dataparser.setup().get_dataparser_outputs(split)


def _intrinsics(cameras) -> torch.Tensor:
    return torch.cat([cameras.fx, cameras.fy, cameras.cx, cameras.cy], dim=-1).double()


def _distortion(cameras) -> torch.Tensor:
    d = cameras.distortion_params
    return torch.zeros(len(cameras), 6, dtype=torch.float64) if d is None else d.reshape(len(cameras), -1).double()


def compare_heldout(reference, outputs, where: str, tolerance: float = CAMERA_TOLERANCE) -> dict:
    """Raise CameraMismatchError unless `outputs` hold the same views as `reference`: the same image
    files (symlinks resolved), camera_to_worlds and intrinsics within `tolerance`, the same sizes,
    camera model and distortion. Returns the largest differences."""
    ref_files = [Path(f).resolve() for f in reference.image_filenames]
    files = [Path(f).resolve() for f in outputs.image_filenames]
    if files != ref_files:
        raise CameraMismatchError(f"{where}: held-out images {[f.name for f in files]} differ from certsdf's {[f.name for f in ref_files]}")
    a, b = reference.cameras, outputs.cameras
    c2w = float((a.camera_to_worlds.double() - b.camera_to_worlds.double()).abs().max())
    intrinsics = float((_intrinsics(a) - _intrinsics(b)).abs().max())
    distortion = float((_distortion(a) - _distortion(b)).abs().max())
    sizes = bool(torch.equal(a.width, b.width) and torch.equal(a.height, b.height))
    types = bool(torch.equal(a.camera_type, b.camera_type))
    found = {"views": len(files), "max_abs_c2w": c2w, "max_abs_intrinsics_px": intrinsics,
             "max_abs_distortion": distortion, "tolerance": tolerance}  # fmt: skip
    if not (c2w <= tolerance and intrinsics <= tolerance and distortion <= tolerance and sizes and types):
        raise CameraMismatchError(f"{where}: held-out cameras differ from certsdf's ({found}; same sizes {sizes}, same model {types})")
    return found


def check_heldout_cameras(specs: Dict[str, Tuple[MethodSpec, Path]], settings: TrainSettings, scene: RealScene) -> tuple:
    """Build every method's held-out dataparser outputs and compare them with certsdf's.

    `specs` maps method name to (spec, data path); it must hold 'certsdf' (the reference, also when
    certsdf itself is not run). Returns (certsdf's outputs, {method: what compare_heldout found}).
    Also checks that masks are used in training exactly when the scene says so."""
    outputs = {name: heldout_outputs(spec, data, settings) for name, (spec, data) in specs.items()}
    reference = outputs["certsdf"]
    found = {}
    for name, out in outputs.items():
        found[name] = compare_heldout(reference, out, f"{scene.name}: {name}")
        has_masks = out.mask_filenames is not None
        if has_masks != scene.masks:
            raise CameraMismatchError(
                f"{scene.name}: {name} would train {'with' if has_masks else 'without'} masks; the scene says masks={scene.masks}"
            )
        found[name]["masks_in_training"] = has_masks
    return reference, found


def reference_views(reference, scene: RealScene, source: Path, scale: float, n_views: int) -> HeldOutViews:
    """certsdf's held-out views at the evaluation scale; DTU with its object masks and view numbers as labels."""
    labels = [Path(f).stem for f in reference.image_filenames]
    mask_files = None
    if scene.fmt == "neus":
        from certsdf_ns.data.neus import read_layout

        layout = read_layout(source)
        index = {p.resolve(): i for i, p in enumerate(layout.images)}
        views = [index[Path(f).resolve()] for f in reference.image_filenames]
        labels = [str(i) for i in views]
        mask_files = None if layout.masks is None else [layout.masks[i] for i in views]
    views = heldout_views(reference, scale, labels, mask_files)
    if n_views > 0 and n_views < len(views.labels):
        keep = slice(0, n_views)
        views = HeldOutViews(views.labels[keep], views.files[keep], views.cameras[keep], views.images[keep],
                             None if views.masks is None else views.masks[keep])  # fmt: skip
    return views


# --------------------------------------------------------------------------- one trial


def run_real_trial(req: RealRequest, opts: TrialOptions, out_dir: Path, device: str,
                   progress: Optional[Callable[[str, float, float], None]] = None) -> dict:  # fmt: skip
    """Train one method on one real scene under the budget, then evaluate (see the module docstring)."""
    spec, scene = req.spec, req.scene
    assert req.real is not None and req.views is not None
    settings = TrainSettings(opts.rays_per_batch, scene.scale, opts.steps_per_save_for(spec.name), device,
                             scratch_dir=Path(out_dir) / "data")  # fmt: skip
    targets = opts.targets(req.budget_s)
    record: dict = {
        "run": req.run_name, "method": spec.name, "scene": scene.name, "scene_path": str(scene.path),
        "scene_format": req.real.fmt, "trained_with_masks": req.real.masks,
        "camera_res_scale_factor": scene.scale, "budget_s": req.budget_s, "settings": asdict(settings),
        "ns_train_args": spec.train_args(scene.path, settings),
        "lpips": LPIPS_NOTE if spec.peer else "not used (certsdf skips LPIPS when its weights are not cached)",
        "checkpoint_loading": CHECKPOINT_NOTE if spec.peer else "torch.load defaults",
        "eval_targets_s": targets, "heldout_views": list(req.views.labels), "n_views": len(req.views.labels),
        "camera_check": req.camera_check, "own_budget": opts.runs_own_budget(spec.name),
    }  # fmt: skip
    train_and_evaluate(req, opts, settings, targets, Path(out_dir), record, _evaluate_real, progress)
    if req.real.usable_metric is not None and not spec.peer:
        record["first_usable_mesh"] = first_usable_mesh(record["meshes"], req.real.usable_metric, req.usable_threshold)
    return record


def _evaluate_real(req: RealRequest, opts: TrialOptions, run: RunResult, out_dir: Path, record: dict, progress) -> None:
    spec, views = req.spec, req.views
    assert views is not None and req.real is not None
    ckpts = run.kept_checkpoints[-1:] if (spec.peer and req.peer_last_only) else run.kept_checkpoints
    by_step = {c.step: c for c in ckpts}
    try:
        pipeline = None
        for i, (step, pipeline) in enumerate(iter_checkpoints(Path(run.config_path), [(c.step, Path(c.path)) for c in ckpts])):
            c = by_step[step]
            metrics = heldout_metrics(pipeline, views, step).to_json()
            metrics.update(train_time_s=c.train_time_s, iterations=c.iterations)
            record["evaluations"].append(metrics)
            if hasattr(getattr(pipeline.model, "field", None), "geometry"):  # certsdf: its certified grid
                res = MeshResult("certsdf-grid", step, c.train_time_s)
                t0 = time.perf_counter()
                try:  # what certsdf-export writes: the grid restricted to observed space
                    made = export_mesh(pipeline, opts.certsdf_mesh_resolution)
                    mesh, removal = made.mesh, made.removal
                except NoSurfaceError:
                    mesh, removal = trimesh.Trimesh(), None
                res.export_s = time.perf_counter() - t0
                keep = out_dir / "runs" / req.run_name / "meshes" / f"certsdf_grid_step{step}.ply"
                record["meshes"].append(score_real_mesh(res, mesh, c.iterations, req, out_dir, keep if i == len(ckpts) - 1 else None))
                record["meshes"][-1]["observed_space"] = None if removal is None else asdict(removal)
            if progress:
                progress("eval", i + 1, len(ckpts))
        del pipeline
        gc.collect()
    except Exception as exc:  # a method that cannot be evaluated is a result too
        record["status"], record["reason"] = "failed", f"evaluation: {exc!r}"
        record["traceback"] = traceback.format_exc()
    if spec.peer and req.peer_exports is not None and ckpts:
        last = ckpts[-1]
        kinds = list(req.peer_exports.kinds)
        for j, kind in enumerate(kinds):
            if progress:
                progress("export", j, len(kinds))
            folder = out_dir / "runs" / req.run_name / "exports" / f"step{last.step}"
            res, mesh = peer_mesh(spec.name, kind, Path(run.config_path), last.step, last.train_time_s, folder,
                                  req.peer_exports, box=req.mesh_box)  # fmt: skip
            if mesh is None:
                record["meshes"].append({**_real_mesh_json(res), "iterations": last.iterations})
                continue
            try:
                record["meshes"].append(score_real_mesh(res, mesh, last.iterations, req, out_dir))
            except Exception as exc:
                res.status, res.reason = "failed", f"scoring: {exc!r}"
                record["meshes"].append({**_real_mesh_json(res), "iterations": last.iterations})


def _real_mesh_json(res: MeshResult) -> dict:
    return {k: v for k, v in res.to_json().items() if k not in GT_ONLY_MESH_KEYS}


def picture_index(views: HeldOutViews, label: Optional[str]) -> int:
    """Index of the held-out view named `label` (the first view when None or absent)."""
    return views.labels.index(label) if label is not None and label in views.labels else 0


def score_real_mesh(res: MeshResult, mesh, iterations: int, req: RealRequest, out_dir: Path,
                    save_as: Optional[Path] = None) -> dict:  # fmt: skip
    """Silhouette IoU/coverage against the held-out masks (where there are masks) and the picture."""
    views = req.views
    assert views is not None and req.real is not None
    out = {**_real_mesh_json(res), "iterations": iterations, "iou": math.nan, "coverage": math.nan}
    if len(mesh.faces) == 0 or not mesh.area > 0:
        out["status"], out["reason"] = "empty", "no surface extracted"
        return out
    out["n_faces"] = len(mesh.faces)
    if views.masks is not None:
        out.update(silhouette_scores(mesh, views.cameras, views.masks, views.labels))
    k = picture_index(views, req.real.picture_view)
    picture = out_dir / "pictures" / f"{req.scene.name}_{res.method}_step{res.step}.png"
    mesh_picture(picture, mesh, views.cameras[k : k + 1], views.images[k])
    out["picture"], out["picture_view"] = str(picture.relative_to(out_dir)), views.labels[k]
    if save_as is not None:
        save_as.parent.mkdir(parents=True, exist_ok=True)
        mesh.export(save_as)
        out["path"] = str(save_as)
    return out


def first_usable_mesh(meshes: Sequence[dict], metric: str, threshold: float) -> dict:
    """The first (in training time) certsdf mesh with `metric` ≥ threshold; 'reached' False when none did."""
    ours = sorted((m for m in meshes if m["method"] == "certsdf-grid"), key=lambda m: m["train_time_s"])
    scored = [m for m in ours if isinstance(m.get(metric), (int, float)) and math.isfinite(m[metric])]
    best = max(scored, key=lambda m: m[metric], default=None)
    base = {"metric": metric, "threshold": threshold, "reached": False,
            "best": None if best is None else {"value": best[metric], "step": best["step"], "train_time_s": best["train_time_s"]}}  # fmt: skip
    for m in scored:
        if m[metric] >= threshold:
            return {**base, "reached": True, "step": m["step"], "iterations": m.get("iterations"),
                    "train_time_s": m["train_time_s"], "minutes": m["train_time_s"] / 60.0, "value": m[metric]}  # fmt: skip
    return base


# --------------------------------------------------------------------------- the suite


def source_of(cfg: RealConfig, scene: RealScene) -> Path:
    return Path(getattr(cfg.data, scene.source))


def build_requests(cfg: RealConfig, out: Path) -> List[RealRequest]:
    """One request per scene and method, in order; nothing is read or written yet."""
    unknown = [s for s in cfg.scene_names if s not in SCENES]
    if unknown:
        raise ValueError(f"unknown real scene(s) {unknown}; known: {', '.join(SCENES)}")
    reqs = []
    for name in cfg.scene_names:
        scene = SCENES[name]
        source = source_of(cfg, scene)
        for m in cfg.methods:
            data = out / "data" / f"{source.name}_{name}" if (m != "certsdf" and scene.fmt == "neus") else source
            spec = real_spec(m, scene, source, cfg.trial.method_extra_args(m), _scene_args(cfg.scene_args, name, m))
            reqs.append(RealRequest(
                spec, Scene(name, data, cfg.scale, None), f"{m}_{name}", cfg.budget_s,
                peer_exports=cfg.export if (cfg.peer_exports and spec.peer) else None,
                real=scene, usable_threshold=cfg.usable_threshold, peer_last_only=cfg.peer_last_only,
            ))  # fmt: skip
    return reqs


def prepare_scenes(cfg: RealConfig, reqs: Sequence[RealRequest], out: Path) -> None:
    """Convert DTU for the peers, check that every method has certsdf's held-out cameras, load the views."""
    settings = TrainSettings(cfg.trial.rays_per_batch, cfg.scale, 1, cfg.resolved_device(), scratch_dir=out / "data")
    for name in dict.fromkeys(r.scene.name for r in reqs):
        scene = SCENES[name]
        source = source_of(cfg, scene)
        group = [r for r in reqs if r.scene.name == name]
        for r in group:
            if r.scene.path != source:
                CONSOLE.print(f"[certsdf-bench] {name}: {source} as a nerfstudio transforms.json in {r.scene.path}")
                dtu_to_nerfstudio(source, r.scene.path, masks=scene.masks)
        specs = {r.spec.name: (r.spec, r.scene.path) for r in group}
        if "certsdf" not in specs:  # certsdf's held-out views are the reference whether or not it runs
            certsdf = real_spec("certsdf", scene, source, cfg.trial.method_extra_args("certsdf"),
                                _scene_args(cfg.scene_args, name, "certsdf"))  # fmt: skip
            specs["certsdf"] = (certsdf, source)
        reference, found = check_heldout_cameras(specs, settings, scene)
        views = reference_views(reference, scene, source, cfg.scale, cfg.trial.n_test_views)
        box = reference.scene_box.aabb.tolist()
        CONSOLE.print(f"[certsdf-bench] {name}: {len(views.labels)} held-out views ({', '.join(views.labels)}), the same "
                      f"cameras for {', '.join(found)} (largest difference {max(f['max_abs_c2w'] for f in found.values()):.2g})")  # fmt: skip
        for r in group:
            r.views, r.camera_check, r.mesh_box = views, found[r.spec.name], box


def run_real(cfg: RealConfig) -> List[dict]:
    out = Path(cfg.results_dir) / "real"
    reqs = build_requests(cfg, out)
    refuse_earlier_trials(out, reqs)  # before converting anything (_run_all checks again)
    prepare_scenes(cfg, reqs, out)
    header = _header("real", cfg, cfg.budget_s)
    header["definitions"] = {
        "psnr": "PSNR (dB, data range 1) of the rendered `rgb` over the whole held-out image, mean over views",
        "psnr_masked": "PSNR over the pixels whose object mask (bilinearly resized) is > 0.5 (DTU)",
        "iou": "silhouette IoU |hit ∧ M| / |hit ∨ M| of the mesh ray-cast from each held-out camera vs the mask M, mean over views",
        "coverage": "|hit ∧ M| / |M|, mean over views",
        "first_usable_mesh": f"training time of the first evaluated checkpoint whose certsdf mesh has IoU ≥ {cfg.usable_threshold:g} "
        f"(dtu_masks) / coverage ≥ {cfg.usable_threshold:g} (dtu_nomasks)",
    }
    records = _run_all("real", cfg, reqs, header, trial=run_real_trial)
    rows = real_rows(records)
    write_csv(out / "summary.csv", rows)
    write_json(out / "suite.json", {**header, "rows": rows})
    write_summary(out)
    plot_real(out, records)
    return records
