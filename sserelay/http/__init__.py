"""The HTTP face: ASGI sink, endpoints, apps, the server and run(config)."""
