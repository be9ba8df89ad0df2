"""Every route of the gateway, one router per resource joined in one: rendering, jobs, models, operations."""
from fastapi import APIRouter

from service.routes import jobs, models, operations, render

api_router = APIRouter()
for resource in (render, jobs, models, operations):
    api_router.include_router(resource.router)
