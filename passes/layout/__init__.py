"""Layout: select-sparse-layout (measured choice of dense / CSR / BSR for each masked weight)."""
from graphopt.passes.layout import select_sparse_layout  # noqa: F401
