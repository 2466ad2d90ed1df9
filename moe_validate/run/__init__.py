"""Running cases: one in this process (``case``), many in isolated workers (``workers``), a whole
run into a results file (``session``), and which cases a run gets (``shards``).

``moe_validate.runner`` re-exports the public names for the CLI, the pytest plugin and tests.
"""
