"""Conversion to an int8 TFLite bundle: ONNX export, quantization, verification, costs, bundle writing, Edge TPU."""
