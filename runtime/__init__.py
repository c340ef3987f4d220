"""Run time: reference interpreter, JIT and kernel cache, autograd, launch."""
