"""Engine limits that config fields are bounded by, in a module that imports no torch: recipes validate against
them before torch loads (`compress validate`)."""

DEFAULT_LOGIT_CHUNK_MB = 256
MAX_LOGIT_CHUNK_MB = 1 << 20  # 1 TiB: a bound for the config field, not a recommendation
