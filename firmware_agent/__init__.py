"""footfall agent: 802.11 probe requests in, private per-window counts out.

The packages follow the data::

    stages/    capture -> parse -> anonymize -> count -> estimate -> people -> privacy
    service/   footfall-agent run: spool, publish, metrics, Home Assistant
    tools/     doctor, audit, evaluate, privacy report, survey, synthetic captures
    kernels/   the numba machinery the stages compile with (ahead of time or JIT)
    contract/  what the aggregator reads: messages, schemas, keys, errors, settings machinery

:mod:`firmware_agent.stages.pipeline` wires the stages; each part declares its settings on its
settings class, and :mod:`firmware_agent.settings` makes the registry of them all;
:mod:`firmware_agent.cli` is ``footfall-agent``.
"""

from pathlib import Path

__version__ = "0.1.0"

BUNDLED_SAMPLE = Path(__file__).with_name("data") / "sample.pcap"
"""The synthetic capture shipped with the package: the demo's and the doctor's source, written
by ``python -m firmware_agent.tools.synthetic --sample``."""
