"""Engines: where a classify run decodes, encodes and scores (the local engine lives in
``pipeline.classify``; ``ray_engine`` spreads the work over a Ray cluster)."""
