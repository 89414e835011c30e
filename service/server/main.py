"""The ASGI application factory that uvicorn workers import."""

from service.config import Settings
from service.observability.logs import configure_logging
from service.server.allocator import collect_less_often, return_large_buffers
from service.server.app import create_app
from service.server.fastpath import InferenceMiddleware


def app_from_environment() -> InferenceMiddleware:
    return_large_buffers()
    collect_less_often()
    settings = Settings()
    configure_logging(settings.log_level, settings.log_format, settings.access_log)
    return create_app(settings)
