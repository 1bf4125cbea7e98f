"""Layer 3: the engine every pass runs in. Model I/O (eager and lazy), the decoder-layer sweep and its contexts,
calibration activations and their offload, checkpoints and resume, faults, MoE, data-parallel ranks, data loading,
progress and atomic output. Imports `compress.quant` and `compress.recipe`, never a plugin."""
