"""Request and response bodies of the HTTP API.

Types and fixed ranges are checked here; what depends on the model (label count, noise size) or on the
server's configuration (maximum n) is checked by the endpoint, whose messages name the valid values.
Unknown fields are rejected, so a misspelt option fails loudly instead of being ignored.
"""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, FiniteFloat, create_model

from core.compose import MODIFIER_FIELDS

Mechanism = Literal["shape", "texture", "background"]
JobFormat = Literal["npz", "png"]
JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
SEED_MAX = 2**63 - 1
NoiseVectors = list[list[FiniteFloat]]  # n vectors of the manifest's noise dim (checked by the endpoint)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# The body of core.compose.MaskModifiers, bounds and descriptions from its one table.
MaskBody = create_model(
    "MaskBody", __base__=Strict, __doc__="The paper's study of the shape mechanism; every draw is seeded by the "
                                         "request's seed.",
    **{name: (float, Field(default, ge=low, le=high, description=text))
       for name, ((low, high), default, text) in MODIFIER_FIELDS.items()},
)


class ModelChoice(Strict):
    model: Optional[str] = Field(None, description="model family; the server's default family when omitted")
    version: Optional[str] = Field(None, description="pin a version; the family's LATEST when omitted")


class CounterfactualRequest(ModelChoice):
    shape: int = Field(description="label of the shape (mask) mechanism")
    texture: int = Field(description="label of the texture (foreground) mechanism")
    background: int = Field(description="label of the background mechanism")
    n: int = Field(1, ge=1, description="images to draw (at most the server's SKDCGN_MAX_N)")
    seed: Optional[int] = Field(None, ge=0, le=SEED_MAX, description="random when omitted; returned in the answer")
    mask: MaskBody = Field(default_factory=MaskBody)
    z: Optional[dict[Mechanism, NoiseVectors]] = Field(
        None, description="explicit noise per mechanism: n vectors each; replaces the drawn z, nothing else"
    )
    return_components: bool = Field(False, description="also return mask, texture and background as composed")
    return_noise: bool = Field(False, description="also return the z actually used, per mechanism")


class MechanismRequest(ModelChoice):
    label: int
    n: int = Field(1, ge=1)
    seed: Optional[int] = Field(None, ge=0, le=SEED_MAX)
    z: Optional[NoiseVectors] = Field(None, description="explicit noise: n vectors")
    return_noise: bool = Field(False, description="also return the z actually used")


class LabelChoices(Strict):
    """Labels a job may draw per mechanism; null means every label of the model."""

    shape: Optional[list[int]] = Field(None, min_length=1)
    texture: Optional[list[int]] = Field(None, min_length=1)
    background: Optional[list[int]] = Field(None, min_length=1)


class JobRequest(ModelChoice):
    n: int = Field(ge=1, description="samples in the dataset (at most the server's SKDCGN_MAX_JOB_N)")
    counterfactuals_per_shape: int = Field(
        1, ge=1, description="k: samples i with equal i // k share the shape label and shape z of the group's first"
    )
    seed: Optional[int] = Field(None, ge=0, le=SEED_MAX)
    format: JobFormat = "npz"
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


class JobStatus(BaseModel):
    id: str
    state: JobState
    progress: JobProgress
    model: str = Field(description="the model family")
    version: str
    manifest_sha256: str
    format: JobFormat
    shards: int = Field(description="result files: 1 for npz; png results are tar shards of SKDCGN_JOB_SHARD_SIZE")
    seed: int
    created: str
    started: Optional[str] = None
    finished: Optional[str] = None
    error: Optional[str] = None
    result_url: Optional[str] = Field(None, description="add ?shard=i (0 ≤ i < shards) when shards > 1")


class JobList(BaseModel):
    jobs: list[JobStatus] = Field(description="newest first")
    next_cursor: Optional[str] = Field(None, description="pass as ?cursor= for the next page; null on the last")
