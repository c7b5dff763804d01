"""Plain, typed building blocks the flows are made of."""
