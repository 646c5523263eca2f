"""Versioned API routers, one per resource (mounted under /v1 by serving.app)."""
