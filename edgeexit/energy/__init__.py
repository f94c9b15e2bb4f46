"""Energy per inference: the operation proxy, board power profiles and power sensors."""
