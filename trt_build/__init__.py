"""ONNX export and TensorRT engine building for diffcam's UNet and VAE."""
