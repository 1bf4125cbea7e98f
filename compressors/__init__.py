"""Compression algorithms (installed as `compress.compressors`). Each module holds one algorithm: a pure tensor
function plus a registered pass. The built-ins are listed in `compress.app.builtins`."""
