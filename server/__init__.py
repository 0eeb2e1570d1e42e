"""fedsecure's Flower ServerApp component (``serverapp = "server.app:app"``)."""

