"""Building blocks of the ``fuse`` pass (passes/fuse.py).

* ``ops``: what each ATen op is to fusion (anchor, elementwise, reduction, attention,
  layout copy, or a free view);
* ``groups``: the group state the patterns grow, with the networkx legality checks
  (single consumer, no cycle after contraction) and the memory each group saves;
* ``patterns``: the named rewrite patterns (epilogue, attention, reduction, elementwise).
"""
