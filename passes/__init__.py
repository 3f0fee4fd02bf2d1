"""Layer 4: every graph rewrite, one module per family. Importing this package registers them all."""
from graphopt.passes import canonicalize, distill, layout, prune, quant  # noqa: F401
