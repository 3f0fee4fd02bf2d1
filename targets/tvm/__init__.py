"""The TVM target: CPU (llvm) and CUDA lowering, kernels, tuning, the host's description."""
from graphopt.targets.tvm.host import default_threads, unpin_workers

# before any TVM thread pool starts (it reads both variables then): host.default_threads, host.unpin_workers
default_threads()
unpin_workers()
