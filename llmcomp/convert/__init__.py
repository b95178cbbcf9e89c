"""Conversions that change a model's architecture but keep its trained weights (dense → MoE)."""
