"""The JSON API under /api/v1: wire models (schemas), dependencies (deps), thin routes (routes/)."""
