"""The Lipschitz constant of the trilinear interpolant of trained grids' node SDF (safe sphere tracing).

    python certsdf_ns/scripts/interpolant_lipschitz.py RUN/config.yml [RUN2/config.yml ...]

Exact (see certsdf_ns.export.query.interpolant_lipschitz), from the checkpoint's logits and σ.
"""
import sys
from pathlib import Path

from certsdf_ns.export.query import CertifiedSDF

if __name__ == "__main__":
    for cfg in sys.argv[1:]:
        sdf = CertifiedSDF.from_checkpoint(Path(cfg), safety_margin=0.0)
        print(f"{cfg}: Lipschitz constant of the interpolated SDF = {sdf.lipschitz:.4f}")
