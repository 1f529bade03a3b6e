"""Built-in model cards: ``<task>-<backbone>`` for every task and backbone (``vae-b4``, ``classifier-simple``).

Registered through the ``deepgalaxy`` entry-point group like any third-party plugin.
"""

from __future__ import annotations

from deepgalaxy.core.hookspecs import hookimpl
from deepgalaxy.core.specs import BACKBONE_ALIASES, TASKS, BackboneSpec, ModelSpec

_TASK_TEXT = {
    "classifier": "merger-stage classifier (71 classes)",
    "fcae": "fully convolutional autoencoder",
    "vae": "VAE over the feature maps of a fully convolutional autoencoder",
    "full": "autoencoder + classifier + VAE with a shared encoder",
}


def builtin_cards() -> list[ModelSpec]:
    """Every task crossed with every built-in backbone, at the paper's defaults (128 px grayscale, 71 classes)."""
    return [
        ModelSpec(
            name=f"{task}-{short}",
            task=task,
            backbone=BackboneSpec(name=backbone),
            description=f"{_TASK_TEXT[task]}, {backbone} encoder",
        )
        for task in TASKS
        for short, backbone in BACKBONE_ALIASES.items()
    ]


@hookimpl
def deepgalaxy_model_cards() -> list[ModelSpec]:
    return builtin_cards()
