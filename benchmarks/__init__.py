"""The sections of bench.py (the one entry point, at the top): one layer and one whole model
timed (layers), seeded training grids and their summaries (quality), generation speed
(decode), the paper's claims and the tables of whole models (sections), and PNGs (plots)."""
