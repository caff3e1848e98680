"""The HTTP routes, one module per area; `api_router` joins them."""

from fastapi import APIRouter

from api.routes import admin, feedback, health, predict

api_router = APIRouter()
for module in (predict, feedback, admin, health):
    api_router.include_router(module.router)
