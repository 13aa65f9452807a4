"""Model parts: DINO (timm), CLIP text (open_clip), heads, SAM decoder (segment-anything)."""
