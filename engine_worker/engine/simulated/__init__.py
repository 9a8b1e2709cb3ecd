"""A simulated GPU for tests and benchmarks: the real engine, a roofline clock, no model.

Selected explicitly (`--load-format simulated --simulate-profile h100-llama3-8b`), never
a serving default. See docs/token_plane.md.
"""
