"""Evaluators (installed as `compress.evaluators`); each declares its protocol and version in the report. The
built-ins are listed in `compress.app.builtins`."""
