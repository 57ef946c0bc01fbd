"""The REST API: thin FastAPI routers that parse, call a service and shape the answer."""
