"""REST routers, all mounted under /v1."""
