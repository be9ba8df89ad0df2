"""POST /counterfactual and POST /generate/{mechanism}: images rendered now, as JSON or as one PNG.

A request is validated against the model it names (service.checks), looked up in the batch cache, and otherwise
rendered by a worker in a batch with other requests (service.batcher), its answer arriving on a Redis reply list.
The answer names its model family, version and manifest sha256 and its seed in headers, and whether it was cached.
A seeded request without explicit z is remembered, so a byte-identical repeat is answered from the cache before
FastAPI parses it (service.repeats, which calls answer_repeat). PNGs are drawn in the gateway's PNG pool, never on
the event loop.
"""
from __future__ import annotations

import asyncio
import base64
import json
import time
from dataclasses import dataclass
from typing import Annotated, Optional

import numpy as np
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

from core.compose import MaskModifiers
from core.imageio import decode, encode, labelled_rows
from core.logs import request_id
from core.messages import INTERACTIVE_QUEUE, RenderRequest
from core.vocabulary import MECHANISMS
from service.checks import check_labels, check_mechanisms, check_n, check_z, model_headers, pick_seed, resolve_model
from service.errors import ServiceError
from service.gateway import Gateway, GatewayDep, generation_key
from service.repeats import REMEMBER
from service.schemas import CounterfactualRequest, Mechanism, MechanismRequest, RenderResponse

PNG_SCALE_MAX = 16
# 8 Mpx (24 MiB of RGB, about 0.1 s of one core to draw): a larger scale × grid is refused (422) before it is drawn;
# n = 64 at scale 8 or n = 16 at scale 16 fit (32×32 images).
PNG_MAX_PIXELS = 1 << 23
GRID_PAD = 2  # pixels between the images of a PNG grid (core.imageio.grid's default)
COUNTERFACTUAL_ROUTE, GENERATE_ROUTE = "/counterfactual", "/generate/{mechanism}"


def wants_png(accept: str) -> bool:
    """The first of image/png or JSON named in Accept wins; JSON when neither is."""
    for item in accept.split(","):
        media = item.split(";")[0].strip().lower()
        if media in ("image/png", "image/*"):
            return True
        if media in ("application/json", "application/*", "*/*"):
            return False
    return False


@dataclass(frozen=True)
class PngLayout:
    """How a PNG answer lays out its images: each upscaled `scale`× (nearest neighbour), `nrow` per row."""
    scale: int = 1
    nrow: Optional[int] = None


async def png_layout(scale: int = Query(1, ge=1, le=PNG_SCALE_MAX,
                                        description="with Accept: image/png: upscale each image this many times "
                                                    "(nearest neighbour)"),
                     nrow: Optional[int] = Query(None, ge=1, description="with Accept: image/png: images per row of "
                                                                         "the grid (at most n are used); ⌈√n⌉ when "
                                                                         "omitted"),
                     ) -> PngLayout:
    return PngLayout(scale, nrow)


LayoutDep = Annotated[PngLayout, Depends(png_layout)]


def png_picture(images: np.ndarray, layout: PngLayout) -> np.ndarray:
    """uint8 [N, H, W, C] images as one picture: the image itself when N = 1, else a grid of `nrow` per row;
    422 when it would be over PNG_MAX_PIXELS."""
    count, height, width, _ = images.shape
    columns = min(layout.nrow or int(np.ceil(np.sqrt(count))), count)
    rows, pad = -(-count // columns), GRID_PAD if count > 1 else 0
    out_height = rows * height * layout.scale + (rows + 1) * pad
    out_width = columns * width * layout.scale + (columns + 1) * pad
    if out_height * out_width > PNG_MAX_PIXELS:
        raise ServiceError(422, f"scale={layout.scale} makes a {out_width}×{out_height} PNG of {count} images, over "
                                f"this server's {PNG_MAX_PIXELS} pixels; ask for a smaller scale or n")
    return labelled_rows([images], columns, scale=layout.scale, pad=pad)


def png_answer(payload: str, layout: PngLayout) -> bytes:
    """The payload's images as one PNG laid out as `layout` says: decoding, upscaling and encoding, CPU work for
    the PNG pool, never the event loop."""
    images = np.stack([decode(base64.b64decode(image)) for image in json.loads(payload)["images"]])
    return encode(png_picture(images, layout))


async def render_response(gw: Gateway, request: RenderRequest, payload: str, cached: bool, accept: str,
                          layout: PngLayout = PngLayout()) -> Response:
    """The answer to a render: the payload's JSON text as it was cached (with `cached` added), or one PNG laid out
    as `layout` says, drawn in the PNG pool."""
    headers = {"X-Cache": "hit" if cached else "miss", "X-Seed": str(request.seed),
               **model_headers(request.family, request.version, request.manifest_sha256)}
    if wants_png(accept):
        drawn = asyncio.get_running_loop().run_in_executor(gw.png_pool, png_answer, payload, layout)
        try:
            png = await asyncio.wait_for(drawn, gw.settings.sync_timeout_s)
        except asyncio.TimeoutError:
            raise ServiceError(504, f"drawing the PNG took over {gw.settings.sync_timeout_s:g} s; the gateway is "
                                    "overloaded: retry later, or ask for a smaller scale or n") from None
        return Response(png, media_type="image/png", headers=headers)
    body = f'{payload[:-1]},"cached":{"true" if cached else "false"}}}'  # the payload is a JSON object
    return Response(body, media_type="application/json", headers=headers)


async def render(gw: Gateway, request: RenderRequest, route: str, accept: str,
                 layout: PngLayout = PngLayout()) -> Response:
    """From the batch cache, or rendered by a worker in a batch with other requests (service.batcher)."""
    started = time.perf_counter()
    key = request.cache_key()
    payload = await gw.broker.cache_get(key)
    cached = payload is not None
    if not cached:
        await gw.broker.admit(INTERACTIVE_QUEUE, gw.settings.queue_bound, f"{request.family}/{request.version}")
        reply = await gw.batcher.render(request)
        if reply.error is not None:
            raise ServiceError(reply.status, reply.error)
        payload = json.dumps(reply.payload, allow_nan=False, separators=(",", ":"))
        gw.background(gw.broker.cache_set(key, payload))  # only successful, encodable answers are cached
    response = await render_response(gw, request, payload, cached, accept, layout)
    count_render(gw, request, route, cached, started)
    return response


def count_render(gw: Gateway, request: RenderRequest, route: str, cached: bool, started: float) -> None:
    """The render metrics of one answered request, labelled by route, model and version."""
    labels = (route, request.family, request.version)
    (gw.metrics.cache_hits if cached else gw.metrics.cache_misses).labels(*labels).inc()
    source = "hit" if cached else "miss"
    gw.metrics.render_latency.labels(*labels, source).observe(time.perf_counter() - started)
    gw.metrics.images_served.labels(request.family, request.version, source).inc(request.n)


def remember(request: Request, task: RenderRequest, asked_version: str | None, seeded: bool) -> None:
    """Let service.repeats answer byte-identical requests from the cache (only seeded ones without explicit z)."""
    if seeded and task.z is None:
        request.scope[REMEMBER] = (task, asked_version)


async def answer_repeat(gw: Gateway, task: RenderRequest, payload: str) -> Response:
    """A repeated render answered from the cache by service.repeats, counted as a hit of its route."""
    started = time.perf_counter()
    response = await render_response(gw, task, payload, True, "application/json")
    route = COUNTERFACTUAL_ROUTE if task.kind == "counterfactual" else GENERATE_ROUTE
    count_render(gw, task, route, True, started)
    return response


PNG_RESPONSES = {200: {"content": {"image/png": {}}, "description": "JSON, or one PNG (a grid when n > 1, "
                                                                     "?scale= and ?nrow= lay it out) with "
                                                                     "Accept: image/png"}}
router = APIRouter(dependencies=[Depends(generation_key)])


@router.post(COUNTERFACTUAL_ROUTE, response_model=RenderResponse, responses=PNG_RESPONSES)
async def counterfactual(body: CounterfactualRequest, request: Request, gw: GatewayDep, layout: LayoutDep):
    """Counterfactual images: the shape of one label, the texture of another, the background of a third."""
    model = resolve_model(gw, body.model, body.version)
    check_mechanisms(model, MECHANISMS)
    labels = {"shape": body.shape, "texture": body.texture, "background": body.background}
    for name, value in labels.items():
        check_labels(model, name, [value])
    check_n(body.n, gw.settings.max_n, "; use POST /jobs for datasets")
    for mechanism, vectors in (body.z or {}).items():
        check_z(model, f"z.{mechanism}", vectors, body.n)
    task = RenderRequest("counterfactual", model.family, model.version, model.manifest_sha256, labels, body.n,
                         pick_seed(body.seed), body.mask.model_dump(), body.z, body.return_components,
                         body.return_noise, request_id.get())
    response = await render(gw, task, COUNTERFACTUAL_ROUTE, request.headers.get("accept", ""), layout)
    remember(request, task, body.version, body.seed is not None)
    return response


@router.post(GENERATE_ROUTE, response_model=RenderResponse, responses=PNG_RESPONSES)
async def generate(mechanism: Mechanism, body: MechanismRequest, request: Request, gw: GatewayDep,
                   layout: LayoutDep):
    """One mechanism's raw output: masks (shape), foreground textures or backgrounds of a label."""
    model = resolve_model(gw, body.model, body.version)
    check_mechanisms(model, [mechanism])
    check_labels(model, "label", [body.label])
    check_n(body.n, gw.settings.max_n, "; use POST /jobs for datasets")
    if body.z is not None:
        check_z(model, "z", body.z, body.n)
    task = RenderRequest("mechanism", model.family, model.version, model.manifest_sha256, {mechanism: body.label},
                         body.n, pick_seed(body.seed), MaskModifiers().to_dict(),
                         {mechanism: body.z} if body.z is not None else None, return_noise=body.return_noise,
                         request_id=request_id.get())
    response = await render(gw, task, GENERATE_ROUTE, request.headers.get("accept", ""), layout)
    remember(request, task, body.version, body.seed is not None)
    return response
