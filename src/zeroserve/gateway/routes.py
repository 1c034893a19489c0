"""THE route table: every path, its method, its metric label and its request model, once.

The routes, their OpenAPI request bodies and the metric labels all come from :data:`ROUTES`.
Each endpoint is a few lines that hand the request to its serving object.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel

from zeroserve.gateway.body import json_body_schema
from zeroserve.gateway.serving import EncodeServing, GenerateServing, PoolServing
from zeroserve.protocol import ChatCompletionRequest, ClassifyRequest, CompletionRequest, EmbeddingRequest

__all__ = ["ROUTES", "Route", "Services", "add_routes", "metric_labels"]


@dataclass(frozen=True)
class Services:
    """The serving objects the endpoints call (``app.state.services``)."""

    pool: PoolServing
    encode: EncodeServing
    generate: GenerateServing


def _services(request: Request) -> Services:
    return request.app.state.services  # type: ignore[no-any-return]


# Endpoint names, docstrings and return annotations are what the OpenAPI document shows.
async def health(request: Request) -> Response:
    return await _services(request).pool.health()


async def pool_status(request: Request) -> dict[str, Any]:
    """Models with their state and recent figures, and the pool's GPU occupancy per node."""
    return await _services(request).pool.status()


async def usage(request: Request) -> dict[str, Any]:
    """The calling key's GPU-seconds today by model, what is left, and when it resets."""
    return await _services(request).pool.usage(request.headers.get("authorization"))


async def list_models(request: Request) -> dict[str, Any]:
    return await _services(request).pool.list_models()


async def get_model(model: str, request: Request) -> dict[str, Any]:
    return await _services(request).pool.get_model(model)


async def embeddings(request: Request) -> Any:
    return await _services(request).encode.embeddings(request)


async def classify(request: Request) -> Any:
    return await _services(request).encode.classify(request)


async def chat_completions(request: Request) -> Response:
    return await _services(request).generate.create(request, chat=True)


async def completions(request: Request) -> Response:
    return await _services(request).generate.create(request, chat=False)


@dataclass(frozen=True)
class Route:
    path: str
    method: str
    endpoint: Callable[..., Any]
    label: str | None  # the metric label; None: a path with parameters ("other")
    body: type[BaseModel] | None = None  # the request model, for the OpenAPI document


ROUTES: tuple[Route, ...] = (
    Route("/health", "GET", health, "health"),
    Route("/v1/zeroserve/status", "GET", pool_status, "status"),
    Route("/v1/usage", "GET", usage, "usage"),
    Route("/v1/models", "GET", list_models, "models"),
    Route("/v1/models/{model:path}", "GET", get_model, None),
    Route("/v1/embeddings", "POST", embeddings, "embeddings", EmbeddingRequest),
    Route("/v1/classify", "POST", classify, "classify", ClassifyRequest),
    Route("/classify", "POST", classify, "classify", ClassifyRequest),
    Route("/v1/chat/completions", "POST", chat_completions, "chat", ChatCompletionRequest),
    Route("/v1/completions", "POST", completions, "completions", CompletionRequest),
)


def metric_labels() -> dict[str, str]:
    """Path to metric label, for the routes without parameters."""
    return {r.path: r.label for r in ROUTES if r.label is not None}


def add_routes(app: FastAPI) -> None:
    for route in ROUTES:
        extra = json_body_schema(route.body) if route.body is not None else None
        app.add_api_route(route.path, route.endpoint, methods=[route.method], openapi_extra=extra)
