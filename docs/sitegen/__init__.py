"""What ``docs/hooks.py`` builds, one job per module.

* :mod:`sitegen.tutorials`: run ``tutorials/NN_name.py`` and render each as a page;
* :mod:`sitegen.api`: the API pages, the check that every API name a page cites exists,
  and the links from code spans to the API pages;
* :mod:`sitegen.results`: the tables and plots read from ``benchmarks/results/``;
* :mod:`sitegen.source`: pages of the kernels' source with line anchors, and the
  ``source:NAME`` links that point into them;
* :mod:`sitegen.figures`: the figures of the concept pages (the idea, the numerics tables).

Everything is read from the repository at build time; nothing needs the network.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
