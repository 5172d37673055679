"""Flax (Linen) model definitions."""
