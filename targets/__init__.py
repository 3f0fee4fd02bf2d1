"""Layer 5: compile targets. `tvm` (llvm CPU), `onnx` export, `torch` (.pt2) export."""
