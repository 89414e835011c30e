"""The online HTTP server: the ASGI app and its fast path, routes, auth, access log, shutdown."""
