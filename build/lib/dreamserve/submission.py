"""Validation of POST /images: raw fields (JSON, or multipart strings) to a checked submission.

Pure: every rule of the contract's POST /images section lives here, each with its exact message.
Rules that need stored state (whether a reference exists, which account has a slot) are checked by
the service afterwards.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from dreamserve.catalogue import AUTO, UPSCALE_TIERS, Catalogue, Model
from dreamserve.errors import BadRequest, InvalidParameter, MissingParameter
from dreamserve.fields import choice, given, integer, number, text
from dreamserve.ids import AssetRef, is_account_id, parse_asset_ref

MAX_PROMPT = 1600
MAX_REPLY = 1024
MAX_REFS = 6
MAX_COUNT = 4
MAX_QUEUE_SECONDS = 3600  # of `queueSeconds`: how long a job may wait for a slot
MAX_SEED = 2_147_483_647
_REF_KEY = re.compile(r"imageRef_(.*)")
REF_NAMES = tuple(f"imageRef_{n}" for n in range(1, MAX_REFS + 1))


@dataclass(frozen=True)
class ImageSubmission:
    """A POST /images request that passed every stateless rule, with defaults applied."""

    model: Model
    prompt: str | None
    ratio: str
    resolution: str
    references: tuple[AssetRef, ...]
    image_strength: float
    account: str | None
    reply_url: str | None
    reply_ref: str | None
    max_jobs: int | None
    seed: int | None
    count: int
    echo: Mapping[str, Any]
    queue_seconds: int = 0  # how long it may wait for a slot (0: a 429 at once when none)

    @property
    def size(self) -> tuple[int, int]:
        """Output pixel size: `auto` takes the ratio nearest the first reference, else 1:1."""
        return self.model.size(self.resolution, self.fixed_ratio)

    @property
    def fixed_ratio(self) -> str:
        if self.ratio != AUTO:
            return self.ratio
        if self.references:
            first = self.references[0]
            return self.model.nearest_ratio(self.resolution, first.width / first.height)
        return "1:1" if "1:1" in self.model.sizes[self.resolution] else self._first_ratio

    @property
    def _first_ratio(self) -> str:
        return next(iter(self.model.sizes[self.resolution]))


def parse_image_submission(fields: Mapping[str, Any], catalogue: Catalogue) -> ImageSubmission:
    """Check `fields` against the contract; raise a BadRequest naming the first bad parameter."""
    model = _model(fields, catalogue)
    references = _references(fields, model)
    prompt = _prompt(fields, model, has_references=bool(references))
    resolution = choice(fields, "resolution", model.resolutions, model.default_resolution)
    ratio = choice(fields, "ratio", model.ratios(resolution), model.default_ratio)
    strength = number(fields, "imageStrength", 0.0, 1.0)
    account = _account(fields, references)
    reply_url = _reply_url(fields)
    reply_ref = text(fields, "replyRef", MAX_REPLY)
    max_jobs = integer(fields, "maxJobs", 1, 50)
    seed = integer(fields, "seed", 0, MAX_SEED)
    count = integer(fields, "count", 1, MAX_COUNT)
    queue_seconds = integer(fields, "queueSeconds", 0, MAX_QUEUE_SECONDS)

    echo: dict[str, Any] = {}
    if prompt is not None:
        echo["prompt"] = prompt
    echo |= {
        "model": model.name,
        "ratio": ratio,
        "resolution": resolution,
        "inputMode": "reference" if references else "generate",
    }
    for name, ref in zip(REF_NAMES, references, strict=False):
        echo[name] = str(ref)
    if references or strength is not None:
        echo["imageStrength"] = 0.5 if strength is None else strength
    optional = {
        "replyUrl": reply_url,
        "replyRef": reply_ref,
        "seed": seed,
        "count": count,
        "queueSeconds": queue_seconds,
    }
    echo |= {name: value for name, value in optional.items() if value is not None}

    return ImageSubmission(
        model=model,
        prompt=prompt,
        ratio=ratio,
        resolution=resolution,
        references=references,
        image_strength=0.5 if strength is None else strength,
        account=account,
        reply_url=reply_url,
        reply_ref=reply_ref,
        max_jobs=max_jobs,
        seed=seed,
        count=MAX_COUNT if count is None else count,
        echo=echo,
        queue_seconds=queue_seconds or 0,
    )


@dataclass(frozen=True)
class UpscaleSubmission:
    """A POST /images/upscale request that passed every stateless rule, with defaults applied.
    Whether the source job exists, is completed and has that image is the service's check."""

    jobid: str
    image_index: int
    resolution: str
    original_strength: float
    detail_strength: float
    max_jobs: int | None
    reply_url: str | None
    reply_ref: str | None
    echo: Mapping[str, Any]


def parse_upscale_submission(fields: Mapping[str, Any]) -> UpscaleSubmission:
    """Check `fields` against the contract's POST /images/upscale rules."""
    jobid = given(fields, "jobid")
    if jobid is None:
        raise MissingParameter("jobid")
    if not isinstance(jobid, str):
        raise InvalidParameter("jobid", jobid, "the jobid of a completed image job")
    index = integer(fields, "imageIndex", 0, MAX_COUNT - 1)
    resolution = choice(fields, "upscaleResolution", UPSCALE_TIERS, "4k")
    original = number(fields, "originalImageStrength", 0.0, 1.0)
    detail = number(fields, "detailStrength", 0.0, 1.0)
    reply_url = _reply_url(fields)
    reply_ref = text(fields, "replyRef", MAX_REPLY)
    max_jobs = integer(fields, "maxJobs", 1, 50)
    echo: dict[str, Any] = {
        "jobid": jobid,
        "imageIndex": 0 if index is None else index,
        "resolution": resolution,
    }
    optional = {"replyUrl": reply_url, "replyRef": reply_ref}
    echo |= {name: value for name, value in optional.items() if value is not None}
    return UpscaleSubmission(
        jobid=jobid,
        image_index=0 if index is None else index,
        resolution=resolution,
        original_strength=0.65 if original is None else original,
        detail_strength=0.5 if detail is None else detail,
        max_jobs=max_jobs,
        reply_url=reply_url,
        reply_ref=reply_ref,
        echo=echo,
    )


def _model(fields: Mapping[str, Any], catalogue: Catalogue) -> Model:
    name = given(fields, "model")
    if name is None:
        return catalogue[catalogue.default_model]
    model = catalogue.get(name) if isinstance(name, str) else None
    if model is None:
        raise InvalidParameter("model", name, ", ".join(catalogue.names))
    return model


def _references(fields: Mapping[str, Any], model: Model) -> tuple[AssetRef, ...]:
    present: dict[str, Any] = {}
    for key in fields:
        match = _REF_KEY.fullmatch(key)
        if match is None or given(fields, key) is None:
            continue
        if key not in REF_NAMES:
            raise BadRequest(
                f"Parameter {key} is not supported. Valid values: imageRef_1 to imageRef_{MAX_REFS}"
            )
        present[key] = fields[key]
    refs: list[AssetRef] = []
    for position, name in enumerate(REF_NAMES, start=1):
        if name not in present:
            later = [key for key in REF_NAMES[position:] if key in present]
            if later:
                raise BadRequest(
                    f"Parameter {later[0]} requires {name}: references must be contiguous "
                    "from imageRef_1"
                )
            break
        if position > model.max_refs:
            most = f"at most {model.max_refs}" if model.max_refs else "no"
            raise BadRequest(
                f"Parameter {name} not allowed: model {model.name} takes {most} reference images"
            )
        value = present[name]
        ref = parse_asset_ref(value) if isinstance(value, str) else None
        if ref is None:
            raise InvalidParameter(
                name, value, "an assetRef from POST /assets or from a completed job's images"
            )
        if refs and ref.account != refs[0].account:
            raise InvalidParameter(
                name, value, f"an assetRef on account {refs[0].account}, like imageRef_1"
            )
        refs.append(ref)
    return tuple(refs)


def _prompt(fields: Mapping[str, Any], model: Model, *, has_references: bool) -> str | None:
    value = fields.get("prompt")
    if value is None or (isinstance(value, str) and not value.strip()):
        if model.prompt_required or not has_references:
            raise MissingParameter("prompt")
        return None
    if not isinstance(value, str):
        raise InvalidParameter("prompt", value, f"text of at most {MAX_PROMPT} characters")
    if len(value) > MAX_PROMPT:
        raise InvalidParameter(
            "prompt", f"{len(value)} characters", f"text of at most {MAX_PROMPT} characters"
        )
    return value


def _reply_url(fields: Mapping[str, Any]) -> str | None:
    value = given(fields, "replyUrl")
    if value is None:
        return None
    valid = f"an http or https URL of at most {MAX_REPLY} characters"
    if not isinstance(value, str) or len(value) > MAX_REPLY:
        raise InvalidParameter("replyUrl", value, valid)
    try:
        parts = urlsplit(value)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
    except ValueError:  # a bad port or bracketed host
        ok = False
    if not ok or any(ch.isspace() for ch in value):
        raise InvalidParameter("replyUrl", value, valid)
    return value


def _account(fields: Mapping[str, Any], references: tuple[AssetRef, ...]) -> str | None:
    value = given(fields, "account")
    if value is None:
        return references[0].account if references else None
    if not isinstance(value, str) or not is_account_id(value):
        raise InvalidParameter("account", value, "an account id REGION:name")
    if references and value != references[0].account:
        raise InvalidParameter(
            "account", value, f"{references[0].account}, the account of the references"
        )
    return value
