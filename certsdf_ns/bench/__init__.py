"""`certsdf-bench`: wall-clock benchmarks of certsdf against nerfstudio's own methods.

Every method is trained by its own `ns-train` in a subprocess, under a time budget, and
evaluated afterwards by one in-process evaluator so that all methods are measured alike.
Modules: `offline` (LPIPS stub), `peer_train`/`peer_export` (launchers), `methods`
(ns-train arguments per method), `runner` (budgeted runs), `evaluate` (test-split PSNR/SSIM),
`meshes` (mesh extraction and geometry metrics), `certify` (certified-bound checks),
`results` (JSON/CSV/plots), `suites` (speed, quality, sigma) and `cli`.
"""
