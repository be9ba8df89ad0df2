"""Request and response bodies of the HTTP API.

Types and fixed ranges are checked here; what depends on the model (label count, noise size) or on the
server's configuration (maximum n) is checked by the endpoint, whose messages name the valid values.
Unknown fields are rejected, so a misspelt option fails loudly instead of being ignored, and types are strict:
`true` or "3" is no label, 0 is no boolean (a number field still takes a JSON integer). Every error the gateway
sends has the body ErrorBody.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, create_model

from core.compose import MODIFIER_FIELDS
from core.settings import Settings
from core.vocabulary import FORMATS, JOB_STATES, MECHANISMS

# The vocabulary's tuples as pydantic types (Literal[tuple] is Literal of its items, in order: the OpenAPI enums).
Mechanism = Literal[MECHANISMS]
JobFormat = Literal[FORMATS]
JobState = Literal[JOB_STATES]
SEED_MAX = 2**63 - 1
FLOAT32_MAX = 3.4028235e38
NAME_MAX = 100  # characters of a model family or version name


def within_float32(value: float) -> float:
    if abs(value) > FLOAT32_MAX:
        raise ValueError(f"{value:.8g} is outside float32's range: noise values must lie within ±{FLOAT32_MAX!r}")
    return value


Float32 = Annotated[float, Field(allow_inf_nan=False), AfterValidator(within_float32)]
NoiseVectors = list[list[Float32]]  # n vectors of the manifest's noise dim (checked by the endpoint)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


# The body of core.compose.MaskModifiers, bounds and descriptions from its one table.
MaskBody = create_model(
    "MaskBody", __base__=Strict, __doc__="The paper's study of the shape mechanism; every draw is seeded by the "
                                         "request's seed.",
    **{name: (float, Field(default, ge=low, le=high, allow_inf_nan=False, description=text))
       for name, ((low, high), default, text) in MODIFIER_FIELDS.items()},
)


class ModelChoice(Strict):
    model: Optional[str] = Field(None, max_length=NAME_MAX,
                                 description="model family; the server's default family when omitted")
    version: Optional[str] = Field(None, max_length=NAME_MAX,
                                   description="pin a version; the family's LATEST when omitted")


class CounterfactualRequest(ModelChoice):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"shape": 3, "texture": 7, "background": 1, "n": 4, "seed": 123, "mask": {"transparency": 0.75},
         "return_components": True},
    ]})

    shape: int = Field(description="label of the shape (mask) mechanism")
    texture: int = Field(description="label of the texture (foreground) mechanism")
    background: int = Field(description="label of the background mechanism")
    n: int = Field(1, ge=1, description="images to draw (at most the server's SKDCGN_MAX_N)")
    seed: Optional[int] = Field(None, ge=0, le=SEED_MAX, description="random when omitted; returned in the answer")
    mask: MaskBody = Field(default_factory=MaskBody)
    z: Optional[dict[Mechanism, NoiseVectors]] = Field(
        None, description="explicit noise per mechanism: n vectors of the model's noise dim each, finite float32 "
                          "values; replaces the drawn z, nothing else"
    )
    return_components: bool = Field(False, description="also return mask, texture and background as composed")
    return_noise: bool = Field(False, description="also return the z actually used, per mechanism")


class MechanismRequest(ModelChoice):
    model_config = ConfigDict(json_schema_extra={"examples": [{"label": 3, "n": 2, "seed": 9}]})

    label: int = Field(description="label of the mechanism (0 .. the model's label count - 1)")
    n: int = Field(1, ge=1, description="images to draw (at most the server's SKDCGN_MAX_N)")
    seed: Optional[int] = Field(None, ge=0, le=SEED_MAX, description="random when omitted; returned in the answer")
    z: Optional[NoiseVectors] = Field(None, description="explicit noise: n vectors of the model's noise dim, finite "
                                                        "float32 values")
    return_noise: bool = Field(False, description="also return the z actually used")


# One optional list per mechanism (the line break of the description is the OpenAPI document's, kept as it was).
LabelChoices = create_model(
    "LabelChoices", __base__=Strict, __doc__="Labels a job may draw per mechanism; null means every label of the "
                                             "model. A list holds at most the model's\nlabel count of labels; "
                                             "duplicates are dropped.",
    **{mechanism: (Optional[list[int]], Field(None, min_length=1)) for mechanism in MECHANISMS},
)


class JobRequest(ModelChoice):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"n": 1000, "seed": 42, "format": "npz", "counterfactuals_per_shape": 2,
         "labels": {"shape": [0, 1, 2], "texture": [3, 4]}, "mask": {"rotation_deg": 30}},
    ]})

    n: int = Field(ge=1, description="samples in the dataset (at most the server's SKDCGN_MAX_JOB_N)")
    counterfactuals_per_shape: int = Field(
        1, ge=1, description="k: samples i with equal i // k share the shape label and shape z of the group's first"
    )
    seed: Optional[int] = Field(None, ge=0, le=SEED_MAX)
    format: JobFormat = Field("npz", description="npz: one file; png: tar shards of PNGs with labels.csv and "
                                                 "provenance.json; webdataset: tar shards of <key>.png, <key>.cls, "
                                                 "<key>.json samples, provenance.json and SHA256SUMS beside them")
    shard_size: Optional[int] = Field(None, ge=1, description="samples per tar shard of a png or webdataset job; "
                                                              "the server's SKDCGN_JOB_SHARD_SIZE when omitted, "
                                                              "and at most that")
    labels: LabelChoices = Field(default_factory=LabelChoices)
    mask: MaskBody = Field(default_factory=MaskBody)


class RenderResponse(BaseModel):
    model: str = Field(description="the model family")
    version: str
    manifest_sha256: str
    provider: str = Field(description="onnxruntime execution provider that rendered the images")
    seed: int = Field(description="sample i drew its noise from numpy SeedSequence([seed, i])")
    n: int
    images: list[str] = Field(description="base64 PNG images")
    components: Optional[dict[str, list[str]]] = Field(None, description="mask, texture, background (base64 PNG)")
    z: Optional[dict[str, list[list[float]]]] = Field(None, description="with return_noise: the z used")
    cached: bool


class JobProgress(BaseModel):
    done: int
    total: int


class JobFile(BaseModel):
    name: str = Field(description="file name: result.npz, result-<shard>.tar, provenance.json or SHA256SUMS")
    bytes: int
    sha256: str = Field(description="computed by the worker that assembled the result")
    url: str = Field(description="GET it (HTTP Range requests resume an interrupted download)")
    store_url: Optional[str] = Field(None, description="with results in an S3-compatible store: a presigned URL that "
                                                       "downloads the file straight from the store, until "
                                                       "store_url_expires (SKDCGN_RESULTS_URL_TTL_S)")
    store_url_expires: Optional[str] = None


class JobStatus(BaseModel):
    id: str
    state: JobState
    progress: JobProgress
    model: str = Field(description="the model family")
    version: str
    manifest_sha256: str
    format: JobFormat
    shards: int = Field(description="data files: 1 for npz; png and webdataset results are tar shards of "
                                    "shard_size samples")
    seed: int
    created: str
    started: Optional[str] = None
    finished: Optional[str] = None
    error: Optional[str] = None
    result_url: Optional[str] = Field(None, description="add ?shard=i (0 ≤ i < shards) when shards > 1")
    files: Optional[list[JobFile]] = Field(None, description="once succeeded: every file of the result (data files, "
                                                             "then a webdataset job's provenance.json and "
                                                             "SHA256SUMS) with its size, sha256 and URL")


class JobChecksums(BaseModel):
    id: str
    algorithm: Literal["sha256"] = "sha256"
    files: dict[str, str] = Field(description="file name -> hex digest, for every file of the result")


class JobList(BaseModel):
    jobs: list[JobStatus] = Field(description="newest first")
    next_cursor: Optional[str] = Field(None, description="pass as ?cursor= for the next page; null on the last")


# --- errors ----------------------------------------------------------------------------------------------------------

class ValidationIssue(BaseModel):
    type: str = Field(description="pydantic's error type, e.g. int_type, missing, extra_forbidden")
    loc: list[Union[str, int]] = Field(description="where: body, query or path, then the field's path")
    msg: str
    input: Optional[Any] = Field(None, description="the offending input, or at most 80 characters of its JSON")
    ctx: Optional[dict[str, str]] = None


class ErrorBody(BaseModel):
    """The body of every answer other than 2xx."""

    error: str = Field(description="what was wrong, and what is valid")
    detail: Optional[list[ValidationIssue]] = Field(None, description="with 422 from validation: each invalid field "
                                                                      "(the first 10)")


def error_responses(settings: Settings) -> dict[int, dict]:
    """OpenAPI `responses` for the errors the gateway answers, each with the ErrorBody schema."""
    size = settings.max_body_bytes
    texts = {
        400: "the body is not valid JSON",
        401: "with SKDCGN_API_KEYS: no X-API-Key header (job endpoints; the rendering endpoints too with "
             "SKDCGN_API_KEYS_FOR_GENERATION)",
        403: "the X-API-Key header holds no valid key",
        404: "no such route, model family, version, mechanism or job (another key's jobs are not found either)",
        405: "the route does not take this method; the Allow header lists those it takes",
        409: "GET /jobs/{job_id}/result and /checksums: the job has not succeeded (yet)",
        410: "GET /jobs/{job_id}/result: the result file is gone",
        413: f"the body is over SKDCGN_MAX_BODY_BYTES ({size} bytes here), by its Content-Length or as streamed",
        415: "a POST body whose Content-Type is not application/json",
        422: f"invalid input: types (strict), ranges, n over SKDCGN_MAX_N ({settings.max_n} here) or "
             f"SKDCGN_MAX_JOB_N ({settings.max_job_n} here), labels outside the model's, z of the wrong shape or "
             "outside float32",
        429: f"a queue is over its bound, or (POST /jobs) the key has SKDCGN_MAX_ACTIVE_JOBS_PER_KEY "
             f"({settings.max_active_jobs_per_key} here) queued or running jobs or has created "
             f"SKDCGN_JOB_CREATE_RATE ({settings.job_create_rate} here) jobs this minute; see Retry-After",
        500: "an unexpected failure of the gateway",
        503: "Redis is unreachable, no worker is up, or the model version is refused by a worker; see Retry-After",
        504: "no worker answered within SKDCGN_SYNC_TIMEOUT_S",
        507: "POST /jobs: the job's result would not fit in the free space of the jobs directory",
    }
    return {status: {"model": ErrorBody, "description": text} for status, text in texts.items()}


def api_description(settings: Settings) -> str:
    """The OpenAPI description: what the service does and this server's limits."""
    return ("Counterfactual images from distilled CGN students: single requests, single mechanisms and bulk dataset "
            "jobs.\n\n"
            f"Limits of this server: n ≤ {settings.max_n} per synchronous request (SKDCGN_MAX_N), "
            f"n ≤ {settings.max_job_n} per job (SKDCGN_MAX_JOB_N), request bodies ≤ {settings.max_body_bytes} bytes "
            f"(SKDCGN_MAX_BODY_BYTES), {settings.max_active_jobs_per_key} queued or running jobs per API key "
            f"(SKDCGN_MAX_ACTIVE_JOBS_PER_KEY), {settings.job_create_rate} jobs created per API key a minute "
            "(SKDCGN_JOB_CREATE_RATE). Every error answers {\"error\": \"...\"} (ErrorBody).")


def declare_key_requirements(spec: dict, settings: Settings) -> dict:
    """The OpenAPI document as this server enforces X-API-Key: an operation that declares the key (the job routes,
    and the rendering routes) gets `{}` beside it, the key then being optional, unless this server requires it: the
    job routes whenever SKDCGN_API_KEYS is set, the rendering routes only with SKDCGN_API_KEYS_FOR_GENERATION too.
    Changes `spec` in place (idempotent) and returns it."""
    for path, operations in spec.get("paths", {}).items():
        required = bool(settings.api_keys) and (path.startswith("/jobs") or settings.api_keys_for_generation)
        for operation in operations.values():
            security = operation.get("security") if isinstance(operation, dict) else None
            if security and not required and {} not in security:
                security.append({})
    return spec
