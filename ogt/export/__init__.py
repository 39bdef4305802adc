"""Target-specific rules and checks."""
