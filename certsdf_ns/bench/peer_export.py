"""`python -m certsdf_ns.bench.peer_export [--bench-load-step N] <ns-export arguments>`: offline-safe `ns-export`.

`ns-export tsdf|poisson` rebuilds the model with `eval_setup`, so for nerfacto it constructs
LPIPS and crashes offline exactly like training would, and then cannot reload the checkpoint
under torch's weights-only loader: :func:`certsdf_ns.bench.offline.prepare_offline_peers` runs first. ns-export always loads the latest
checkpoint; `--bench-load-step N` (consumed here, not passed on) makes it load step N instead,
so meshes can be extracted along the training curve.
"""

from __future__ import annotations

import sys
from typing import List, Optional

from certsdf_ns.bench.offline import prepare_offline_peers


def _split_load_step(argv: List[str]) -> tuple:
    if "--bench-load-step" not in argv:
        return None, argv
    i = argv.index("--bench-load-step")
    return int(argv[i + 1]), argv[:i] + argv[i + 2 :]


def main(argv: Optional[List[str]] = None) -> None:
    load_step, args = _split_load_step(list(sys.argv[1:] if argv is None else argv))
    prepare_offline_peers()
    import nerfstudio.scripts.exporter as exporter
    from nerfstudio.utils.eval_utils import eval_setup

    if load_step is not None:

        def eval_setup_at_step(config_path, *a, **kw):
            def at_step(config):
                config.load_step = load_step
                return config

            kw.setdefault("update_config_callback", at_step)
            return eval_setup(config_path, *a, **kw)

        exporter.eval_setup = eval_setup_at_step  # the exporter imported eval_setup by name
    sys.argv = ["ns-export", *args]
    exporter.entrypoint()


if __name__ == "__main__":
    main()
