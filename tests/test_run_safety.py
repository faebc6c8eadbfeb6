"""Nothing a user trained is lost, and no input ends in a traceback (issue 14).

Every class of case goes through the real CLIs as subprocesses and asserts the exit code, the
absence of a traceback, a message naming the file or field, and that the first run's files are
byte-identical afterwards. One module fixture trains that first run (16 px scene, 16³ grid, 5
steps, checkpoints at steps 2 and 4); the failing commands are started concurrently where they
are independent, since each pays nerfstudio's ~10 s start-up.

Permission cases (a read-only output folder, an unreadable data folder) need the permission bits
to count: root passes them through CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH, so those commands run
with both capabilities dropped from their bounding set (see `_as_ordinary_user`).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import ns
from forked_cli import ForkedProcess, forkable
from hooks.sitecustomize import DISK_FULL_ENV, fault_env

from certsdf_ns.data.dataparser import CertSDFDataParserConfig
from certsdf_ns.training.run_folder import is_disk_full, low_space_warning
from certsdf_ns.training.trainer import PARTIAL_SUFFIX

TINY = [
    "--vis", "tensorboard", "--viewer.quit-on-train-completion", "True",
    "--pipeline.model.grid-resolution", "16", "--pipeline.datamanager.train-num-rays-per-batch", "64",
    "--pipeline.model.hash-log2-size", "10", "--pipeline.model.hash-levels", "2", "--pipeline.model.hash-max-res", "32",
    "--pipeline.model.num-coarse-samples", "16", "--pipeline.model.num-fine-samples", "8",
    "--steps-per-eval-batch", "1000", "--steps-per-eval-image", "1000",
]  # fmt: skip
PR_CAPBSET_DROP = 24
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 1, 2


# --------------------------------------------------------------------------- helpers


def _as_ordinary_user() -> None:
    """preexec_fn: drop the capabilities that let root ignore permission bits (no-op for other users)."""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _can_drop_capabilities() -> bool:
    if os.geteuid() != 0:
        return True
    probe = subprocess.run(["true"], preexec_fn=_as_ordinary_user, capture_output=True)  # noqa: PLW1509
    return probe.returncode == 0


def _start(args: Sequence, env_extra: Optional[Dict[str, str]] = None, ordinary_user: bool = False):
    """Start a CLI: a `subprocess.Popen`, or a ForkedProcess (tests/forked_cli.py) where a fork from an
    interpreter that imported nerfstudio already reproduces it (not as an ordinary user)."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", **(env_extra or {}))
    target = None if ordinary_user else forkable([str(a) for a in args], env)
    if target is not None:
        return ForkedProcess(target, args, None, env)
    return subprocess.Popen(
        [str(a) for a in args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        preexec_fn=_as_ordinary_user if ordinary_user else None,
    )  # fmt: skip


def _finish(procs: Dict[str, subprocess.Popen], timeout: float = 600) -> Dict[str, subprocess.CompletedProcess]:
    done = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=timeout)
        done[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return done


def _run(args: Sequence, **kwargs) -> subprocess.CompletedProcess:
    return _finish({"one": _start(args, **kwargs)})["one"]


def _refused(proc: subprocess.CompletedProcess, *expected: str, code: int = 2) -> str:
    """Assert exit `code`, no traceback, and every `expected` text in the (whitespace-normalised) stderr."""
    both = proc.stdout + proc.stderr
    assert proc.returncode == code, (proc.args, both[-3000:])
    assert "Traceback" not in both, (proc.args, both[-3000:])
    err = " ".join(proc.stderr.split())
    for text in expected:
        assert " ".join(str(text).split()) in err, (proc.args, text, err[-2000:])
    return err


def _hashes(folder: Path) -> Dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _train(scene: Path, out: Path, name: str, *extra, env_extra=None, ordinary_user=False) -> subprocess.Popen:
    args = [ns("ns-train"), "certsdf", "--data", scene, "--output-dir", out, "--experiment-name", name,
            "--timestamp", "t", *TINY, *extra]  # fmt: skip
    return _start(args, env_extra=env_extra, ordinary_user=ordinary_user)


def _relocated_run(run_dir: Path, dst: Path, edit=None) -> Path:
    """A copy of a run folder whose config.yml points at the copy (ns-train records absolute paths)."""
    shutil.copytree(run_dir, dst)
    config = yaml.load((dst / "config.yml").read_text(), Loader=yaml.Loader)
    config.output_dir = dst.parent.parent.parent
    config.experiment_name, config.timestamp = dst.parent.parent.name, dst.name
    assert config.get_base_dir() == dst
    if edit is not None:
        edit(config)
    (dst / "config.yml").write_text(yaml.dump(config))
    return dst


class FirstRun:
    def __init__(self, scene: Path, out: Path) -> None:
        self.scene, self.out = scene, out
        self.run_dir = out / "first" / "certsdf" / "t"
        self.models = self.run_dir / "nerfstudio_models"
        self.hashes = _hashes(self.run_dir)

    def assert_untouched(self) -> None:
        """The run folder holds the same files, byte for byte (nothing changed, removed or added)."""
        assert _hashes(self.run_dir) == self.hashes


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> FirstRun:
    from certsdf_ns.data.scenes import make_scene

    root = tmp_path_factory.mktemp("run_safety")
    scene = make_scene(root / "scene", image_size=16, n_train=4, n_val=1, n_test=1)
    out = root / "out"
    proc = _finish({"first": _train(scene, out, "first", "--max-num-iterations", 5, "--steps-per-save", 2,
                                    "--save-only-latest-checkpoint", "False")})["first"]  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = FirstRun(scene, out)
    assert sorted(p.name for p in run.models.iterdir()) == ["step-000000002.ckpt", "step-000000004.ckpt"]
    return run


# --------------------------------------------------------------------------- run folders


def test_rerun_into_a_run_folder_never_touches_the_run(first_run: FirstRun) -> None:
    """A second ns-train with the same experiment name and timestamp is refused (naming the folder
    and --load-dir); a resume that does not fit the checkpoint is refused naming the setting and the
    trained value, before config.yml is written; both leave every file byte-identical. A resume in
    place keeps the first run's checkpoints: keep-latest pruning removes only the resumed process's own."""
    procs = _finish({
        "rerun": _train(first_run.scene, first_run.out, "first", "--max-num-iterations", 2),
        "misfit": _train(first_run.scene, first_run.out, "first", "--max-num-iterations", 2,
                         "--load-dir", first_run.models, "--pipeline.model.grid-resolution", 24),
    })  # fmt: skip
    _refused(procs["rerun"], f"the run folder {first_run.run_dir} already holds a run", "config.yml",
             "step-000000004.ckpt", f"--load-dir {first_run.models}")  # fmt: skip
    _refused(procs["misfit"], "--pipeline.model.grid-resolution is 24 here but the checkpoint was trained with 16")
    first_run.assert_untouched()

    resume = _finish({"resume": _train(first_run.scene, first_run.out, "first", "--load-dir", first_run.models,
                                       "--max-num-iterations", 4, "--steps-per-save", 2)})["resume"]  # fmt: skip
    assert resume.returncode == 0, resume.stdout[-3000:] + resume.stderr[-3000:]
    assert f"Done loading Nerfstudio checkpoint from {first_run.models / 'step-000000004.ckpt'}".replace(" ", "") in "".join(
        resume.stdout.split()
    )  # resumed from the newest checkpoint (rich may fold the long path)
    after = _hashes(first_run.run_dir)
    for name, digest in first_run.hashes.items():
        if name.startswith("nerfstudio_models/"):
            assert after[name] == digest, name  # the first run's checkpoints are untouched
    # steps 5..8 saved 6 and 8; pruning (save-only-latest, the default) removed only its own step 6
    assert sorted(p.name for p in first_run.models.iterdir()) == [
        "step-000000002.ckpt", "step-000000004.ckpt", "step-000000008.ckpt"
    ]  # fmt: skip
    assert torch.load(first_run.models / "step-000000008.ckpt", map_location="cpu", weights_only=True)["step"] == 8
    first_run.hashes = after  # later tests compare against the folder as it is now


# --------------------------------------------------------------------------- full disk


def test_full_disk_at_save_keeps_the_previous_checkpoint(first_run: FirstRun, tmp_path: Path) -> None:
    """The step-4 save fails with ENOSPC after 64 KiB (as a full disk does; torch wraps it in
    'unexpected pos'): exit 2 naming the folder and the space needed, the partial file removed,
    the step-2 checkpoint complete and loadable."""
    proc = _run([ns("ns-train"), "certsdf", "--data", first_run.scene, "--output-dir", tmp_path, "--experiment-name",
                 "full", "--timestamp", "t", *TINY, "--max-num-iterations", 6, "--steps-per-save", 2],
                env_extra=fault_env({DISK_FULL_ENV: "4"}))  # fmt: skip
    models = tmp_path / "full" / "certsdf" / "t" / "nerfstudio_models"
    _refused(proc, f"the disk holding {models} is full: saving step-000000004.ckpt needs about", "MiB",
             "The partial file was removed", "step-000000002.ckpt is kept", f"--load-dir {models}")  # fmt: skip
    assert sorted(p.name for p in models.iterdir()) == ["step-000000002.ckpt"]
    assert not models.with_name(models.name + PARTIAL_SUFFIX).exists()
    assert torch.load(models / "step-000000002.ckpt", map_location="cpu", weights_only=True)["step"] == 2
    first_run.assert_untouched()


def test_space_is_checked_before_saves() -> None:
    """The warning before a save, and the recognition of torch's wrapped ENOSPC."""
    folder = Path("/ckpts")
    assert low_space_warning(folder, need=100, free=1000) is None
    assert "a later save may fail" in low_space_warning(folder, need=100, free=150)
    assert "the next save will fail" in low_space_warning(folder, need=100, free=50)
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    except RuntimeError as wrapped:
        assert is_disk_full(wrapped)
    assert not is_disk_full(RuntimeError("unexpected pos 1 vs 2"))
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))


# --------------------------------------------------------------------------- output locations


def test_unwritable_outputs_are_refused_before_work(first_run: FirstRun, tmp_path: Path) -> None:
    """Every CLI refuses an output location it cannot write (an existing file, a path under /proc,
    a read-only folder) with exit 2 and a message naming it, before loading or training; a
    benchmark refuses a results folder holding trained runs of an earlier benchmark."""
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    read_only.chmod(0o555)
    ordinary = _can_drop_capabilities()
    config = first_run.run_dir / "config.yml"
    earlier = tmp_path / "bench" / "speed" / "runs" / f"certsdf_{first_run.scene.name}" / "bench" / "certsdf" / "run"
    earlier.mkdir(parents=True)
    (earlier / "config.yml").write_text("an earlier trial")
    cases = {  # name: (command, texts the message must hold, runs without root's permission override)
        "train-file": ([ns("ns-train"), "certsdf", "--data", first_run.scene, "--output-dir", a_file, *TINY],
                       [f"{a_file} is a file", "--output-dir"], False),
        "export-file": ([ns("certsdf-export"), "--load-config", config, "--output-dir", a_file],
                        [f"--output-dir {a_file} is a file, not a folder"], False),
        "eval-mesh-proc": ([ns("certsdf-eval-mesh"), "pred.ply", "gt.ply", "--json", "/proc/certsdf/m.json"],
                           ["--json /proc/certsdf/m.json: its folder /proc/certsdf cannot be created"], False),
        "bench-file": ([ns("certsdf-bench"), "report", "--results-dir", a_file],
                       [f"--results-dir {a_file} is a file, not a folder"], False),
        "make-scene-proc": ([ns("certsdf-make-scene"), "/proc/certsdf-scene", "--image-size", 16],
                            ["out_dir /proc/certsdf-scene cannot be created"], False),
        "demo-proc": ([ns("certsdf-demo"), "--scene-dir", "/proc/certsdf-demo", "--output-dir", tmp_path / "demo"],
                      ["--scene-dir /proc/certsdf-demo cannot be created"], False),
        "bench-earlier-trials": ([ns("certsdf-bench"), "speed", "--results-dir", tmp_path / "bench", "--scene",
                                  first_run.scene, "--methods", "certsdf"],
                                 [f"{earlier} already holds a trained run (config.yml)", "Pass another --results-dir"],
                                 False),
    }  # fmt: skip
    if ordinary:
        cases["train-read-only"] = (
            [ns("ns-train"), "certsdf", "--data", first_run.scene, "--output-dir", read_only, *TINY],
            [f"--output-dir: the run folder {read_only}/", "cannot be created (Permission denied)"], True,
        )  # fmt: skip
        cases["make-scene-read-only"] = (
            [ns("certsdf-make-scene"), read_only / "scene", "--image-size", 16],
            [f"out_dir {read_only}/scene cannot be created (Permission denied)"], True,
        )  # fmt: skip
    procs = _finish({name: _start(cmd, ordinary_user=user) for name, (cmd, _, user) in cases.items()})
    for name, (_, expected, _) in cases.items():
        _refused(procs[name], *expected)
    assert a_file.read_text() == "not a folder" and not any(read_only.iterdir())
    assert (earlier / "config.yml").read_text() == "an earlier trial" and sorted(os.listdir(earlier)) == ["config.yml"]
    assert not list(tmp_path.rglob("*.ckpt"))
    first_run.assert_untouched()
    if not ordinary:  # every other case above was checked
        pytest.skip("running as root without CAP_SETPCAP: cannot drop CAP_DAC_OVERRIDE, so the read-only cases did not run")


# --------------------------------------------------------------------------- loading


def test_loading_checks_name_the_checkpoint_folder_and_setting(first_run: FirstRun, tmp_path: Path) -> None:
    """ns-eval, ns-viewer and certsdf-export on a run whose checkpoint folder is empty, certsdf-export
    on one whose folder is missing (nerfstudio's commands reach the same check, see
    CertSDFTrainerConfig.__setattr__), and ns-eval on a config.yml that does not fit its checkpoint:
    exit 2 naming the folder / the setting (nerfstudio itself ends in an IndexError or a
    size-mismatch traceback). certsdf-export refuses a lattice that would not fit in memory before
    it reads any checkpoint."""
    empty = _relocated_run(first_run.run_dir, tmp_path / "o" / "empty" / "certsdf" / "t")
    for ckpt in (empty / "nerfstudio_models").iterdir():
        ckpt.unlink()
    missing = _relocated_run(first_run.run_dir, tmp_path / "o" / "missing" / "certsdf" / "t")
    shutil.rmtree(missing / "nerfstudio_models")
    misfit = _relocated_run(first_run.run_dir, tmp_path / "o" / "misfit" / "certsdf" / "t",
                            edit=lambda c: setattr(c.pipeline.model, "colour_encoding", "dense"))  # fmt: skip
    empty_models, missing_models = empty / "nerfstudio_models", missing / "nerfstudio_models"
    cases = {
        "eval-empty": ([ns("ns-eval"), "--load-config", empty / "config.yml", "--output-path", tmp_path / "e.json"],
                       [f"checkpoint folder {empty_models} is empty"]),
        "viewer-empty": ([ns("ns-viewer"), "--load-config", empty / "config.yml"],
                         [f"checkpoint folder {empty_models} is empty"]),
        "export-empty": ([ns("certsdf-export"), "--load-config", empty / "config.yml", "--output-dir", tmp_path / "m"],
                         [f"checkpoint folder {empty_models} is empty"]),
        "export-missing": ([ns("certsdf-export"), "--load-config", missing / "config.yml", "--output-dir", tmp_path / "m"],
                           [f"checkpoint folder {missing_models} does not exist"]),
        "eval-misfit": ([ns("ns-eval"), "--load-config", misfit / "config.yml", "--output-path", tmp_path / "e.json"],
                        ["--pipeline.model.colour-encoding is dense here but the checkpoint was trained with hash"]),
        "export-too-large": ([ns("certsdf-export"), "--load-config", empty / "config.yml", "--output-dir",
                              tmp_path / "m", "--resolution", 100_000],
                             ["--resolution 100000 needs about", "GB for its marching-cubes lattice", "use --resolution"]),
    }  # fmt: skip
    procs = _finish({name: _start(cmd) for name, (cmd, _) in cases.items()})
    for name, (_, expected) in cases.items():
        _refused(procs[name], *expected)
    assert not (tmp_path / "e.json").exists() and not (tmp_path / "m" / "certsdf_mesh.ply").exists()
    first_run.assert_untouched()


def _model_state(grid: int = 16, encoding: str = "hash", table: int = 4096, hidden: int = 64, backend: str = "torch"):
    """The layout-bearing entries of a CertSDFModel state dict."""
    state = {"field._extra_state": {"backend": backend}, "field.geometry.logits": torch.zeros(grid, grid, grid),
             "field.colour_mlp.layers.0.weight": torch.zeros(hidden, 24)}  # fmt: skip
    if encoding == "hash":
        state["field.position_encoding.hash_table"] = torch.zeros(table, 2)
    else:
        state["field.position_encoding.features"] = torch.zeros(8, 32, 32, 32)
    return state


@pytest.mark.parametrize(
    "trained,expected",
    [
        (dict(grid=24), "--pipeline.model.grid-resolution is 16 here but the checkpoint was trained with 24"),
        (dict(encoding="dense"), "--pipeline.model.colour-encoding is hash here but the checkpoint was trained with dense"),
        (dict(table=8192), "hash table entries (hash-levels × 2^hash-log2-size) is 4096 here but the checkpoint was trained with 8192"),
        (dict(hidden=32), "--pipeline.model.hidden-dim-colour is 64 here but the checkpoint was trained with 32"),
        (dict(backend="tcnn"), "trained with the 'tcnn' colour backend but this model is built with 'torch'"),
    ],
    ids=["grid", "encoding", "hash-size", "hidden", "backend"],
)
def test_checkpoint_fit_names_the_setting_and_trained_value(trained, expected) -> None:
    from certsdf_ns.method.checkpoint_fit import fit_message, fit_problems

    assert fit_problems(_model_state(), _model_state()) == []
    problems = fit_problems(_model_state(**trained), _model_state())
    assert len(problems) == 1 and expected in fit_message(problems), problems


# --------------------------------------------------------------------------- image modes


def _gradient(size: int = 16) -> np.ndarray:
    """An RGBA test pattern with every channel distinct (uint8)."""
    i, j = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    return np.stack([i * 15, j * 15, (i + j) * 7, 255 - i * 10], axis=-1).astype(np.uint8)


def _save_mode(path: Path, mode: str) -> None:
    """The test pattern in PIL mode `mode`, as PNG where PNG can hold the mode and TIFF otherwise
    (under the .png name nerfstudio's Blender parser appends; PIL reads the format from the content)."""
    rgba = Image.fromarray(_gradient(), "RGBA")
    if mode == "RGB-colour-key":
        rgba.convert("RGB").save(path, format="PNG", transparency=(0, 0, 0))
        return
    image = Image.fromarray(np.asarray(rgba.convert("L"), dtype=np.uint16) * 257) if mode == "I;16" else rgba.convert(mode)
    image.save(path, format="PNG" if mode in ("1", "P", "LA", "I;16") else "TIFF")


def _replace_train_images(scene: Path, dst: Path, write) -> Path:
    shutil.copytree(scene, dst)
    for png in sorted(dst.glob("*/r_*.png")):
        write(png)
    return dst


REFUSED_MODES = [
    ("1", "1-bit black and white"), ("P", "palette indices"), ("PA", "palette indices"), ("LA", "2 channels"),
    ("I", "32-bit integer"), ("I;16", "16-bit grey"), ("F", "floating-point"), ("CMYK", "CMYK channels"),
    ("YCbCr", "YCbCr"), ("LAB", "Lab channels"), ("RGB-colour-key", "colour key"),
]  # fmt: skip


@pytest.mark.parametrize("mode,why", REFUSED_MODES, ids=[m for m, _ in REFUSED_MODES])
def test_image_mode_nerfstudio_would_misread_is_refused(mode, why, first_run: FirstRun, tmp_path, capsys) -> None:
    data = _replace_train_images(first_run.scene, tmp_path / "scene", lambda p: _save_mode(p, mode))
    assert Image.open(data / "train" / "r_0.png").mode == ("RGB" if mode == "RGB-colour-key" else mode)
    with pytest.raises(SystemExit) as exit_info:
        CertSDFDataParserConfig(data=data).setup().get_dataparser_outputs("train")
    assert exit_info.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "r_0.png" in err and why in err and "Convert it to 8-bit RGB or RGBA" in err, err


def _write_16bit(path: Path, channels: int) -> None:
    import cv2

    rgba16 = _gradient().astype(np.uint16) * 256 + 100  # high byte = the 8-bit value; a wrap would give 100
    order = [2, 1, 0, 3][:channels]  # OpenCV writes BGR(A)
    cv2.imwrite(str(path), rgba16[..., order])


@pytest.mark.parametrize("kind", ["L", "RGB", "RGBA", "RGB16", "RGBA16"])
def test_readable_image_modes_are_read_correctly(kind, first_run: FirstRun, tmp_path) -> None:
    """8-bit grey, RGB and RGBA and 16-bit RGB(A) PNGs reach the training images with the right values
    (16 bits scaled to 8, grey repeated to RGB), not wrapped or reinterpreted."""
    from nerfstudio.data.datasets.base_dataset import InputDataset

    def write(png: Path) -> None:
        if kind.endswith("16"):
            _write_16bit(png, 4 if kind == "RGBA16" else 3)
        else:
            Image.fromarray(_gradient(), "RGBA").convert(kind).save(png)

    data = _replace_train_images(first_run.scene, tmp_path / "scene", write)
    outputs = CertSDFDataParserConfig(data=data).setup().get_dataparser_outputs("train")
    outputs.alpha_color = None  # compare the raw channels
    image = InputDataset(outputs).get_numpy_image(0)
    rgba = _gradient()
    expected = {
        "L": np.asarray(Image.fromarray(rgba, "RGBA").convert("L"))[..., None].repeat(3, axis=2),
        "RGB": rgba[..., :3], "RGBA": rgba, "RGB16": rgba[..., :3], "RGBA16": rgba,
    }[kind]  # fmt: skip
    np.testing.assert_array_equal(image, expected)


def test_cli_refuses_a_palette_scene(first_run: FirstRun, tmp_path: Path) -> None:
    """The image-mode check through ns-train: exit 2 naming the image and its mode, before training."""
    data = _replace_train_images(first_run.scene, tmp_path / "scene", lambda p: _save_mode(p, "P"))
    proc = _run([ns("ns-train"), "certsdf", "--data", data, "--output-dir", tmp_path / "out", *TINY])
    _refused(proc, "transforms_train.json, frame 0", f"{data / 'train' / 'r_0.png'} has PIL mode 'P'", "palette")
    assert not list((tmp_path / "out").rglob("*.ckpt")) and not list((tmp_path / "out").rglob("config.yml"))
    first_run.assert_untouched()


# --------------------------------------------------------------------------- camera fields


def _nerfstudio_scene(scene: Path, dst: Path) -> Path:
    """The Blender scene's train split as a nerfstudio transforms.json with explicit intrinsics."""
    import math

    meta = json.loads((scene / "transforms_train.json").read_text())
    shutil.copytree(scene / "train", dst / "images")
    w, h = Image.open(dst / "images" / "r_0.png").size
    focal = 0.5 * w / math.tan(0.5 * meta["camera_angle_x"])
    frames = [{"file_path": f"images/{Path(f['file_path']).name}.png", "transform_matrix": f["transform_matrix"]}
              for f in meta["frames"]]  # fmt: skip
    (dst / "transforms.json").write_text(json.dumps({"fl_x": focal, "fl_y": focal, "cx": w / 2, "cy": h / 2,
                                                     "w": w, "h": h, "k1": 0.0, "frames": frames}))  # fmt: skip
    return dst


BAD_CAMERA = [  # (id, edit of the transforms.json object, text the message must hold)
    ("fl_x-string", lambda m: m.update(fl_x="500"), "'fl_x' is '500'; it must be a positive focal length"),
    ("fl_x-nan", lambda m: m.update(fl_x=float("nan")), "'fl_x' is nan"),
    ("fl_y-negative", lambda m: m.update(fl_y=-3.0), "'fl_y' is -3.0; it must be a positive focal length"),
    ("w-fraction", lambda m: m.update(w=15.5), "'w' is 15.5; it must be a positive whole number"),
    ("h-bool", lambda m: m.update(h=True), "'h' is True"),
    ("cx-outside", lambda m: m.update(cx=40.0), "'cx' is 40.0; it must be a principal point inside the image (0 to w=16)"),
    ("k1-inf", lambda m: m.update(k1=float("inf")), "'k1' is inf; it must be a finite number"),
    ("distortion-short", lambda m: m.update(distortion_params=[0.1, 0.0]), "'distortion_params' is [0.1, 0.0]"),
    ("camera-model", lambda m: m.update(camera_model="FISHEYE"), "'camera_model' is 'FISHEYE'"),
    ("frame-fl_y", lambda m: m["frames"][2].update(fl_y=None), "frame 2: 'fl_y' is None"),
]  # fmt: skip


@pytest.mark.parametrize("case,edit,expected", BAD_CAMERA, ids=[c[0] for c in BAD_CAMERA])
def test_bad_camera_field_is_refused(case, edit, expected, first_run: FirstRun, tmp_path, capsys) -> None:
    data = _nerfstudio_scene(first_run.scene, tmp_path / "ns")
    CertSDFDataParserConfig(data=data).setup().get_dataparser_outputs("train")  # the intact copy is accepted
    capsys.readouterr()
    meta = json.loads((data / "transforms.json").read_text())
    edit(meta)
    (data / "transforms.json").write_text(json.dumps(meta))
    with pytest.raises(SystemExit) as exit_info:
        CertSDFDataParserConfig(data=data).setup().get_dataparser_outputs("train")
    assert exit_info.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert str(data / "transforms.json") in err and expected in err, err


def test_cli_refuses_bad_camera_fields(first_run: FirstRun, tmp_path: Path, capsys) -> None:
    """Camera fields through ns-train (a nerfstudio fl_x of NaN), and a Blender camera_angle_x of `true`
    (a bool is an int in Python) through the dataparser."""
    nerfstudio = _nerfstudio_scene(first_run.scene, tmp_path / "ns")
    meta = json.loads((nerfstudio / "transforms.json").read_text())
    meta["fl_x"] = float("nan")
    (nerfstudio / "transforms.json").write_text(json.dumps(meta))
    proc = _run([ns("ns-train"), "certsdf", "--data", nerfstudio, "--output-dir", tmp_path / "out", *TINY])
    _refused(proc, f"{nerfstudio / 'transforms.json'}: 'fl_x' is nan")
    assert not list((tmp_path / "out").rglob("config.yml"))

    blender = shutil.copytree(first_run.scene, tmp_path / "blender")
    meta = json.loads((blender / "transforms_train.json").read_text())
    meta["camera_angle_x"] = True
    (blender / "transforms_train.json").write_text(json.dumps(meta))
    with pytest.raises(SystemExit) as exit_info:
        CertSDFDataParserConfig(data=blender).setup().get_dataparser_outputs("train")
    assert exit_info.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"{blender / 'transforms_train.json'}: 'camera_angle_x'" in err and "invalid (True)" in err, err
    first_run.assert_untouched()


# --------------------------------------------------------------------------- --data


def test_data_that_is_not_a_readable_folder_is_refused(first_run: FirstRun, tmp_path: Path, capsys) -> None:
    """--data as a folder that cannot be listed and a character device (through ns-train), a file and
    a broken link (through the dataparser)."""
    unreadable = shutil.copytree(first_run.scene, tmp_path / "unreadable")
    unreadable.chmod(0o000)
    ordinary = _can_drop_capabilities()
    cases = {
        "unreadable": (unreadable, f"data folder {unreadable} cannot be read (Permission denied)", True),
        "device": ("/dev/null", "data path /dev/null is neither a folder nor a file", False),
    }  # fmt: skip
    try:
        procs = _finish({
            name: _start([ns("ns-train"), "certsdf", "--data", data, "--output-dir", tmp_path / "out" / name, *TINY],
                         ordinary_user=user and ordinary)
            for name, (data, _, user) in cases.items()
        })  # fmt: skip
    finally:
        unreadable.chmod(0o755)
    for name, (_, expected, user) in cases.items():
        if ordinary or not user:
            _refused(procs[name], expected)

    a_file = tmp_path / "scene.txt"
    a_file.write_text("x")
    broken = tmp_path / "broken"
    broken.symlink_to(tmp_path / "nowhere")
    for data, expected in ((a_file, f"data path {a_file} is a file; pass the scene folder"),
                           (broken, f"data path {broken} is a broken symbolic link")):  # fmt: skip
        with pytest.raises(SystemExit) as exit_info:
            CertSDFDataParserConfig(data=data).setup().get_dataparser_outputs("train")
        assert exit_info.value.code == 2
        err = " ".join(capsys.readouterr().err.split())
        assert expected in err, err
    first_run.assert_untouched()
    if not ordinary:  # every other case above was checked
        pytest.skip("running as root without CAP_SETPCAP: cannot drop CAP_DAC_READ_SEARCH, so root read the folder")
