"""Export of MoSEAR models to ONNX and TensorRT (``mosear-export``)."""
