"""Distillation objectives: guidance distillation and invertible consistency distillation (losses only)."""
