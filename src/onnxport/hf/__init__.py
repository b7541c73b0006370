"""transformers, in one room: loading and every version shim (see `compat`)."""
