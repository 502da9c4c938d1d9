"""The HTTP API: FastAPI routers, one per resource. Handlers parse, call the service, reply."""
