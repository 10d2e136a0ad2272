"""footfall agent: 802.11 probe requests in, private per-window counts out.

The agent reads top to bottom as its data flows::

    capture -> parse -> anonymize -> count -> (privacy -> publish)

Each stage is one module taking and returning arrays; :mod:`firmware_agent.pipeline`
wires them together.
"""

__version__ = "0.1.0"
