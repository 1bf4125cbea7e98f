"""Layer 2: quantization primitives. Uniform grids and their codes, weight records (what a compressed matrix stores),
activation fake-quantization, bit plans, and the weight layout of linear modules. Imports only `compress.recipe`."""
