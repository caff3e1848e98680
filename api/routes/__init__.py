"""The HTTP routes, one module per area; `api_router` joins them."""

from fastapi import APIRouter

from api.routes import admin, calls, feedback, health, predict, stream, v2

api_router = APIRouter()
for module in (predict, calls, stream, feedback, admin, health, v2):
    api_router.include_router(module.router)
