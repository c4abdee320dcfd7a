"""Plug-ins written outside byzddp/: a model, a dataset, a rule and an attack (docs/extending.md)."""
