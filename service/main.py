"""The ASGI application factory that uvicorn workers import."""

from service.app import create_app
from service.config import Settings
from service.inference import InferenceMiddleware
from service.logs import configure_logging


def app_from_environment() -> InferenceMiddleware:
    settings = Settings()
    configure_logging(settings.log_level, settings.log_format, settings.access_log)
    return create_app(settings)
