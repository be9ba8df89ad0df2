"""A request against the model it names, for the render and job routes: the model resolved to a version now (so
the request finishes on that version whatever LATEST says later), the request checked against that model and this
server's limits, its seed, and the headers that name the model behind a file or PNG answer.

Each refusal is a ServiceError that says what is valid; no message echoes more than a short prefix of the input.
"""
from __future__ import annotations

import secrets

from core.manifest import ManifestError, VersionNotFound
from service.catalog import ResolvedModel, UnknownModel
from service.errors import ServiceError, clip
from service.gateway import Gateway

RANDOM_SEED_BITS = 32  # seeds the gateway picks stay exact in JavaScript clients


def resolve_model(gw: Gateway, family: str | None, version: str | None) -> ResolvedModel:
    try:
        return gw.catalog.resolve(family or gw.settings.default_model, version)
    except (UnknownModel, VersionNotFound) as exc:
        raise ServiceError(404, str(exc)) from exc
    except ManifestError as exc:
        raise ServiceError(503, f"the model cannot be served: {exc}") from exc


def check_mechanisms(model: ResolvedModel, needed) -> None:
    missing = [m for m in needed if m not in model.mechanisms]
    if missing:
        raise ServiceError(404, f"model {model.family}/{model.version} has no {', '.join(missing)} mechanism; "
                                f"it has: {', '.join(model.mechanisms)}")


def check_labels(model: ResolvedModel, field: str, values) -> None:
    if len(values) > model.label_count:
        raise ServiceError(422, f"{field}: {len(values)} labels listed, more than model {model.family}'s "
                                f"{model.label_count} labels 0..{model.label_count - 1}; list each at most once")
    bad = [value for value in values if not 0 <= value < model.label_count]
    if bad:
        raise ServiceError(422, f"{field}: label {clip(bad[0])} is out of range; model {model.family} has labels "
                                f"0..{model.label_count - 1}")


def check_n(n: int, maximum: int, hint: str) -> None:
    if n > maximum:
        raise ServiceError(422, f"n={clip(n)} is over this server's maximum of {maximum}{hint}")


def check_z(model: ResolvedModel, field: str, vectors: list[list[float]], n: int) -> None:
    if len(vectors) != n or any(len(vector) != model.noise_dim for vector in vectors):
        raise ServiceError(422, f"{field} must hold n={n} vectors of {model.noise_dim} numbers each")


def pick_seed(seed: int | None) -> int:
    return seed if seed is not None else secrets.randbits(RANDOM_SEED_BITS)


def model_headers(family: str, version: str, sha256: str) -> dict[str, str]:
    """The model behind an answer, for answers whose body is an image or a file."""
    return {"X-Model-Family": family, "X-Model-Version": version, "X-Manifest-SHA256": sha256}
