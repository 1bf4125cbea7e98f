"""Layer 4 (a plugin, beside compressors, evaluators and export): report.json sizes and digests, report.md and
report.html. Imports the engine and below, no other plugin."""
