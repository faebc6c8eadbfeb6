"""The Lipschitz constant of the trilinear interpolant of trained grids' node SDF (safe sphere tracing).

    python scripts/studies/interpolant_lipschitz.py RUN/config.yml [RUN2/config.yml ...]

Exact (see certsdf_ns.export.query.interpolant_lipschitz), from the checkpoint's logits and σ.
"""
import sys
from pathlib import Path

from certsdf_ns.export.query import CertifiedSDF


def main() -> None:
    for cfg in sys.argv[1:]:
        sdf = CertifiedSDF.from_checkpoint(Path(cfg), safety_margin=0.0)
        print(f"{cfg}: Lipschitz constant of the interpolated SDF = {sdf.lipschitz:.4f}")


if __name__ == "__main__":
    main()
