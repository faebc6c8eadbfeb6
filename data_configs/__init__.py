"""Dataset presets, one JSON per format; shipped inside the package as ``certsdf_ns.data_configs``."""
