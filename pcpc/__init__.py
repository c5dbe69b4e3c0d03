"""pcpc: a compiler-centric model export pipeline (functional models -> MLIR -> IREE VMFB)."""

__version__ = "0.1.0"
