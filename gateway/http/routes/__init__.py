"""The HTTP routes, thin: each reads its inputs, calls a service, shapes the answer."""
