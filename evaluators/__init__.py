"""Evaluators (installed as `compress.evaluators`); each declares its protocol and version in the report. Their
configs live in `configs.py`, which imports no torch; the built-ins are declared in `compress.app.builtins`."""
