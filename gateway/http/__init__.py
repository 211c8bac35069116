"""The gateway's HTTP app: routes, schemas, uploads, errors."""
