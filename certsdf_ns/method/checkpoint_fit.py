"""Does a checkpoint fit the model it is loaded into? If not, which setting differs?

`ns-train --load-dir` builds the model from the command line, not from the run's config.yml,
so a forgotten flag (the grid resolution, the colour encoding) makes PyTorch's
`load_state_dict` fail with a "size mismatch" traceback listing tensor shapes. The settings
that decide the parameter layout can be read back from a model state dict itself, so here
they are read from both the checkpoint and the freshly built model and compared by name:
the message says which flag differs and the value the checkpoint was trained with.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping

import torch

LOGITS = "field.geometry.logits"
HASH_TABLE = "field.position_encoding.hash_table"
DENSE_FEATURES = "field.position_encoding.features"
FIRST_COLOUR_LAYER = "field.colour_mlp.layers.0.weight"
FIELD_EXTRA = "field._extra_state"


def layout_settings(state: Mapping[str, Any]) -> Dict[str, Any]:
    """The layout-deciding settings readable from a CertSDFModel state dict, by CLI flag name.

    Missing entries (e.g. tcnn keeps its colour weights in one flat vector) are left out.
    """
    settings: Dict[str, Any] = {}
    extra = state.get(FIELD_EXTRA)
    if isinstance(extra, dict) and "backend" in extra:
        settings["backend"] = extra["backend"]
    logits = state.get(LOGITS)
    if isinstance(logits, torch.Tensor) and logits.dim() == 3:
        settings["grid-resolution"] = int(logits.shape[0])
    if DENSE_FEATURES in state:
        settings["colour-encoding"] = "dense"
        features = state[DENSE_FEATURES]
        settings["dense-features"], settings["dense-resolution"] = int(features.shape[0]), int(features.shape[1])
    elif any(k.startswith("field.position_encoding.") for k in state):
        settings["colour-encoding"] = "hash"
        if HASH_TABLE in state:
            settings["hash table entries (hash-levels × 2^hash-log2-size)"] = int(state[HASH_TABLE].shape[0])
    layer = state.get(FIRST_COLOUR_LAYER)
    if isinstance(layer, torch.Tensor):
        settings["hidden-dim-colour"] = int(layer.shape[0])
    return settings


def backend_message(trained: str, built: str) -> str:
    """The sentence for a checkpoint of the other colour backend (also used by the field itself)."""
    return (
        f"this checkpoint was trained with the '{trained}' colour backend but this model is built with "
        f"'{built}'; the colour weights cannot be converted. Load it where {trained} is available "
        f"(tcnn needs tinycudann and CUDA), or retrain with --pipeline.model.backend {built}."
    )


def fit_problems(checkpoint: Mapping[str, Any], model: Mapping[str, Any]) -> List[str]:
    """Sentences naming each setting in which a checkpoint's model state differs from the model's."""
    trained, built = layout_settings(checkpoint), layout_settings(model)
    if "backend" in trained and "backend" in built and trained["backend"] != built["backend"]:
        return [backend_message(trained["backend"], built["backend"])]  # every colour weight differs then
    problems = []
    for name, value in built.items():
        if name in trained and trained[name] != value:
            flag = f"--pipeline.model.{name}" if " " not in name else name
            problems.append(f"{flag} is {value} here but the checkpoint was trained with {trained[name]}.")
    if problems:
        return problems
    # Anything else: name the first parameters whose shapes differ (or that only one side has).
    shapes = [
        f"{k}: {tuple(v.shape)} in the checkpoint, {tuple(model[k].shape)} here"
        for k, v in checkpoint.items()
        if isinstance(v, torch.Tensor) and isinstance(model.get(k), torch.Tensor) and v.shape != model[k].shape
    ]
    if shapes:
        problems.append("parameter shapes differ (" + "; ".join(shapes[:3]) + ").")
    return problems


def fit_message(problems: List[str]) -> str:
    return (
        "the checkpoint does not fit this model's configuration: "
        + " ".join(problems)
        + " Pass the flags the run was trained with (its config.yml records them), or start a new run."
    )
