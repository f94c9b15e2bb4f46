"""Workstation side (torch, TensorFlow, onnx2tf): models, training, post-training, own networks, conversion; never
imported by the device side."""
