"""Using a trained model: the predictor, folder prediction, tiling, overlays, the demo page and
export (merged checkpoint, ONNX)."""
