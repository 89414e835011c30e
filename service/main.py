"""The ASGI application factory that uvicorn workers import."""

from fastapi import FastAPI

from service.app import create_app
from service.config import Settings
from service.logs import configure_logging


def app_from_environment() -> FastAPI:
    settings = Settings()
    configure_logging(settings.log_level, settings.log_format, settings.access_log)
    return create_app(settings)
