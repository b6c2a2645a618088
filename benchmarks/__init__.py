"""Kiln's benchmarks: load generator, baselines (sequential and static-batching diffusers pipelines), the limit
from raw component times, and reports (JSON + PNG). Entry points: `kiln bench`, `python -m kiln.benchmarks`."""
