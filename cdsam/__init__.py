"""cdsam: text-promptable segmentation with a DINO ViT, frozen CLIP text and the SAM decoder."""

__version__ = "0.1.0"
