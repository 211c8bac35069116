"""Sluice's stages: the runtime that talks AMQP for every consumer, and one module per stage."""
