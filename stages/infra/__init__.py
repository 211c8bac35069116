"""Shared infrastructure of every Sluice process: broker, logs, tracing, metrics, memory."""
