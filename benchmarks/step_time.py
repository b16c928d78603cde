"""Step-time benchmark of MMPareto: ``python benchmarks/step_time.py --help``.

A thin entry script: the benchmark lives in the ``mmpbench`` package beside this file (models, methods,
check, timing, lightning_path, memory, report, cli). The package has another name than this script on
purpose: run as a script, this file's folder comes first on ``sys.path``, and a package called
``step_time`` would shadow it (or be shadowed by it).
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as ``python benchmarks/step_time.py`` the folder is on sys.path already; loaded any other way
# (runpy, importlib from a path) it may not be.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from mmpbench import main

if __name__ == "__main__":
    main()
