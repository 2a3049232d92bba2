"""Property testing of the attention backends, shipped with the package.

* :mod:`lazyattention.testing.strategies`: Hypothesis strategies that draw the structure
  of a case (documents, requests, placements, block size, heads, RoPE) and a seed, and
  :func:`~lazyattention.testing.strategies.build`, which makes its tensors.
* :mod:`lazyattention.testing.properties`: the differential and metamorphic properties
  a backend's attention functions must hold, as plain functions.
* :mod:`lazyattention.testing.check`: ``lazyattention check``, which runs them on the
  user's device.

The project's own tests import the same strategies and properties. Nothing is imported
here at package import time: Hypothesis is needed only by the modules that use it.
"""
