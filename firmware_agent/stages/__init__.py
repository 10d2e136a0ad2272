"""The agent's data flow, one module per stage, in the order frames go through them::

    capture / live -> parse -> anonymize -> count -> estimate -> people -> privacy

:mod:`.pipeline` wires them; each stage takes and returns the arrays of :mod:`.batch`, and the
settings of :mod:`.config` (numba-free). Stages import the contract and the kernels, never the
service, the tools or the settings registry (``lint-imports`` holds it, see ``pyproject.toml``).
"""
