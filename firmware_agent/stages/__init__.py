"""The agent's data flow, one module per stage, in the order frames go through them::

    capture / live -> parse -> anonymize -> count -> estimate -> people -> privacy

:mod:`.pipeline` wires them; each stage takes and returns arrays. Stages import the contract and
the kernels, never the service or the tools.
"""
