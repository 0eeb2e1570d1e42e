"""fedsecure's Flower ClientApp component (``clientapp = "client.app:app"``)."""

