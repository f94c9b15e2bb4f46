"""Networks of users' own: a module with one output per exit (stage_network), a multi-output ONNX file (stage_onnx),
and cutting any traceable module into stages at named submodules (split)."""
