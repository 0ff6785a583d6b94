"""Using a trained model: load a run, export it to ONNX, run it on ONNX Runtime."""
