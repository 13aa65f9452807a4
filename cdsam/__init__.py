"""cdsam: text-promptable segmentation with a DINO ViT, frozen CLIP text and the SAM decoder.

``cdsam.load_model(path)`` loads a checkpoint or export for inference (see `cdsam.inference.predictor`).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.3.0"


def __getattr__(name: str) -> Any:
    # Lazy, so `import cdsam` (every stage does) does not pull in torch-heavy modules.
    if name in ("load_model", "Predictor", "Prediction"):
        from cdsam.inference import predictor as predict

        return getattr(predict, name)
    raise AttributeError(f"module 'cdsam' has no attribute {name!r}")
