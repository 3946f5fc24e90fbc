"""Graph -> Relax: the op-by-op lowering driver and the converters graphopt adds to TVM's importer."""
