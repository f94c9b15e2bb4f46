"""Workstation side (torch, TensorFlow, onnx2tf): models, training, methods, conversion; never imported by the device side."""
