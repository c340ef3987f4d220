"""Middle and back end: core IR, simplification, block-sparsity analysis, Triton emission."""
