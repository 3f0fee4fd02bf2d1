"""Layer 3: pass base class and registry, pipeline text and YAML recipes, instruments, the pass manager."""
from graphopt.pm.manager import PassManager, PassRecord, build_passes
from graphopt.pm.pipeline import PassSpec, format_pipeline, load_pipeline, parse_pipeline, parse_recipe
from graphopt.pm.registry import (Contract, Pass, PassContext, PassResult, describe_options, get_pass, register_pass,
                                  registered_passes)

__all__ = ["PassManager", "PassRecord", "build_passes", "PassSpec", "format_pipeline", "load_pipeline",
           "parse_pipeline", "parse_recipe", "Contract", "Pass", "PassContext", "PassResult", "describe_options",
           "get_pass", "register_pass", "registered_passes"]
