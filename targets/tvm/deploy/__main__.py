"""python -m graphopt.targets.tvm.deploy: see the package doc."""
import sys

from graphopt.targets.tvm.deploy import main

sys.exit(main())
