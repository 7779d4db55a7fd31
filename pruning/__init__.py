"""Pruning: data, models, the training engine, pruning methods, schedules and evaluation."""
