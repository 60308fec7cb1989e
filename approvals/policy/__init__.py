"""The policy gate: rules, risk, thresholds, grants and versions."""
