"""Model definitions of the zoo, built from configs (no downloaded weights)."""
