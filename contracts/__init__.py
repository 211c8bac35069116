"""Sluice's contracts: message models, routing keys, topology and settings — pure data.

Nothing here imports aio-pika or FastAPI; the gateway and the stage runtime both build on it.
"""
