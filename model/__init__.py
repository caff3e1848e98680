"""The emotion network, its ONNX export, the ONNX Runtime wrapper and the model artifact format."""
