"""`certsdf-demo`: create the offline demo scene and train certsdf on it through `ns-train`.

Runs the real CLI (a subprocess of `ns-train certsdf`), so what the demo shows is what a user
gets. Prints where the checkpoint is and how to evaluate, export and view it.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

from certsdf_ns.output_paths import OutputLocationError, check_writable_dir
from certsdf_ns.scenes import make_scene


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="certsdf-demo", description=__doc__)
    p.add_argument("--scene-dir", type=Path, default=Path("demo_data/demo_scene"), help="where the demo scene is written")
    p.add_argument("--output-dir", type=Path, default=Path("outputs"), help="ns-train output folder")
    p.add_argument("--image-size", type=int, default=100, help="rendered image size (pixels)")
    p.add_argument("--steps", type=int, default=600, help="training iterations (about 1 s each on 2 CPU cores)")
    p.add_argument("--viewer", action="store_true", help="open nerfstudio's viewer on 127.0.0.1:7007 while training")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:  # both before rendering and training (ns-train checks its run folder again)
        check_writable_dir(args.output_dir, "--output-dir")
        if not (args.scene_dir / "transforms_train.json").exists():
            check_writable_dir(args.scene_dir, "--scene-dir")
    except OutputLocationError as exc:
        print(f"certsdf-demo: error: {exc}", file=sys.stderr)
        return 2
    if not (args.scene_dir / "transforms_train.json").exists():
        print(f"[certsdf-demo] rendering the demo scene into {args.scene_dir} ...", flush=True)
        make_scene(args.scene_dir, image_size=args.image_size, n_train=80, n_val=8, n_test=10)
    else:
        print(f"[certsdf-demo] reusing the demo scene in {args.scene_dir}", flush=True)

    ns_train = shutil.which("ns-train") or str(Path(sys.executable).with_name("ns-train"))
    cmd = [
        ns_train, "certsdf",
        "--data", str(args.scene_dir),
        "--output-dir", str(args.output_dir),
        "--experiment-name", "demo",
        "--max-num-iterations", str(args.steps),
        "--steps-per-save", str(max(100, args.steps // 4)),
        "--vis", "viewer+tensorboard" if args.viewer else "tensorboard",
        "--viewer.quit-on-train-completion", "True",
    ]  # fmt: skip
    print("[certsdf-demo] " + " ".join(cmd), flush=True)
    rc = subprocess.call(cmd)
    if rc != 0:
        print(f"[certsdf-demo] ns-train failed with exit code {rc}", file=sys.stderr)
        return rc
    runs = sorted((args.output_dir / "demo" / "certsdf").glob("*/config.yml"), key=lambda p: p.stat().st_mtime)
    if not runs:
        print(f"[certsdf-demo] no run found under {args.output_dir}", file=sys.stderr)
        return 1
    config = runs[-1]
    ckpts = sorted((config.parent / "nerfstudio_models").glob("*.ckpt"))
    print()
    print(f"[certsdf-demo] checkpoint: {ckpts[-1] if ckpts else '(none)'}")
    print(f"[certsdf-demo] config:     {config}")
    print(f"[certsdf-demo] ground-truth mesh: {args.scene_dir / 'gt_mesh.ply'}")
    print("  evaluate:  ns-eval --load-config " + str(config) + " --output-path eval.json")
    print("  view:      ns-viewer --load-config " + str(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
