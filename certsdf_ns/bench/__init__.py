"""`certsdf-bench`: wall-clock benchmarks of certsdf against nerfstudio's own methods.

Every method is trained by its own `ns-train` in a subprocess, under a budget of training
seconds, and evaluated afterwards by one in-process evaluator so that all methods are
measured alike. Modules:

- `offline`: LPIPS stub and numpy allow-list (what peers need offline, under torch ≥ 2.6);
- `peer_train` / `peer_export`: `python -m` launchers around ns-train / ns-export;
- `methods`: each method's ns-train arguments; `data`: scenes by name;
- `runner`: one budgeted run (SIGINT at the budget, RSS polling, checkpoint pruning);
- `evaluate`: test-split PSNR/SSIM; `meshes`: meshes and Chamfer/F-score; `certify`: the
  certified-bound check;
- `trial`: train + evaluate one method on one scene; `suites`: speed, quality, sigma;
  `real`: certsdf vs nerfacto on real captures (DTU, fruit, cup: held-out views, mesh silhouettes);
  `results`: JSON/CSV/plots and the machine description; `cli`: the console script.
"""
