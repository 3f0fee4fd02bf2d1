"""The TVM target: CPU (llvm) and CUDA lowering, kernels, tuning, the host's description."""
from graphopt.targets.tvm.host import unpin_workers

unpin_workers()  # before any TVM thread pool starts (host.unpin_workers)
