"""Stages of the pipeline: one module per concern (see DESIGN.md)."""
