"""pcpc.mlir: lowering to MLIR with iree-turbine, meta.json signatures, compile targets, the build graph."""
