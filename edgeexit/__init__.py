"""edgeexit: early-exit neural networks on edge devices (device runtime)."""

__version__ = "0.1.0"
