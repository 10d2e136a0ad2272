"""The agent's tools beside the service: doctor, audit, evaluate, privacy report, survey,
capture statistics, and the synthetic captures the tests and benchmarks replay."""
