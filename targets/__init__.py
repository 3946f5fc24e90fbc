"""Backends: TVM lowering, target registry, builds, tuning and cross-compilation."""
