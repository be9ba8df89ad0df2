"""A version folder's manifest, assembled beside the ONNX export: what the students are, how they were made
(the recipe, all of its stages) and how faithful they are.

The manifest contract itself (required keys, file checks) is core.manifest's; this module only fills it in.
"""
from __future__ import annotations

import datetime as dt
from pathlib import Path

from core.hashing import sha256_file
from core.manifest import SCHEMA_VERSION, recorded_students
from training.recipe import Recipe
from training.students import StudentConfig, TinyGenerator, count_parameters
from training.teachers.loading import TeacherAdapter

KL_FORMULATION = "mean per-pixel Bernoulli KL(teacher || student)"


def training_block(recipe: Recipe, configs: dict[str, StudentConfig], **details) -> dict:
    """The manifest's `training` summary. The recipe is the source of truth; this block keeps the keys older
    readers use (`student` while every mechanism shares one config, `classes`) plus `students` per mechanism."""
    students = {m: config.to_dict() for m, config in configs.items()}
    first = next(iter(students.values()))
    return {
        "steps": {m: recipe.total_steps(m) for m in configs},
        "students": students,
        **({"student": first} if all(config == first for config in students.values()) else {}),
        "discriminator_channels": recipe.discriminator_channels,
        "seed": recipe.seed,
        "classes": recipe.classes,
        "kl": KL_FORMULATION,
        **details,
    }


def build_manifest(version_dir: Path, version: str, teacher: TeacherAdapter, export_blocks: dict,
                   students: dict[str, TinyGenerator], recipe: Recipe, training: dict, metrics: dict) -> dict:
    """The manifest of the version being written in `version_dir` (every file already there gets its sha256)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "family": teacher.family,
        "version": version,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "teacher": {"name": teacher.name, "sha256": teacher.sha256, "parameters": teacher.parameters},
        "image_size": teacher.image_size,
        "noise": teacher.noise.to_manifest(),
        "texture_shuffle": teacher.texture_shuffle,
        "labels": {"count": teacher.n_classes, "names": teacher.label_names},
        **export_blocks,
        "student_parameters": {m: count_parameters(s) for m, s in students.items()},
        "recipe": recipe.to_dict(),
        "training": training,
        "metrics": metrics,
        "files": {path.name: sha256_file(path) for path in sorted(version_dir.iterdir()) if path.is_file()},
    }


def student_configs(manifest: dict) -> dict[str, StudentConfig]:
    """Each mechanism's StudentConfig as a manifest records it (per mechanism, or one shared by older versions)."""
    return {m: StudentConfig(**config) for m, config in recorded_students(manifest).items()}
