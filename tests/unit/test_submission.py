"""POST /images validation: one test per contract rule, with the exact message."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from support import ASSET_REFS, IMAGE_FIELDS

from dreamserve.catalogue import default_catalogue
from dreamserve.errors import BadRequest
from dreamserve.submission import ImageSubmission, parse_image_submission

CATALOGUE = default_catalogue()
MODELS = (
    "seedream-5.0-lite, seedream-4.7, seedream-4.6, seedream-4.5, seedream-4.1, seedream-4.0, "
    "nano-banana, seedream-3.0, gpt-image-2"
)
RATIOS = "1:1, 3:4, 16:9, 4:3, 9:16, 2:3, 3:2, 21:9"
REF_A = "US:a@x.com-image:w685:h900:s86866-uri:images/2026/03/02/1.jpg"
REF_A2 = "US:a@x.com-image:w1000:h500:s1234-uri:images/2026/03/02/2.jpg"
REF_B = "US:b@x.com-image:w10:h10:s10-uri:images/2026/03/02/3.jpg"
REF_SHAPE = "an assetRef from POST /assets or from a completed job's images"


def parse(**fields: Any) -> ImageSubmission:
    return parse_image_submission(fields, CATALOGUE)


def refused(message: str, **fields: Any) -> None:
    with pytest.raises(BadRequest) as caught:
        parse(**fields)
    assert caught.value.message == message
    assert caught.value.status == 400


# Seed request and defaults


def test_the_seed_request_echoes_exactly_its_fields_and_input_mode() -> None:
    submission = parse(
        prompt="A stunning aurora borealis over a frozen lake at midnight",
        model="seedream-4.0",
        ratio="16:9",
        resolution="2k",
    )
    assert submission.echo == {
        "prompt": "A stunning aurora borealis over a frozen lake at midnight",
        "model": "seedream-4.0",
        "ratio": "16:9",
        "resolution": "2k",
        "inputMode": "generate",
    }
    assert submission.size == (2560, 1440)


def test_defaults_model_seedream_4_6_ratio_auto_resolution_2k_count_4() -> None:
    submission = parse(prompt="x")
    assert submission.model.name == "seedream-4.6"
    assert (submission.ratio, submission.resolution, submission.count) == ("auto", "2k", 4)
    assert submission.image_strength == 0.5
    assert submission.size == (2048, 2048)  # auto without references is 1:1
    assert submission.echo == {
        "prompt": "x",
        "model": "seedream-4.6",
        "ratio": "auto",
        "resolution": "2k",
        "inputMode": "generate",
    }


def test_model_without_auto_ratio_defaults_to_1_1_and_its_own_resolution() -> None:
    submission = parse(prompt="x", model="seedream-3.0")
    assert (submission.ratio, submission.resolution, submission.size) == ("1:1", "1k", (1328, 1328))


def test_webhook_and_extension_fields_are_echoed() -> None:
    submission = parse(prompt="x", replyUrl="https://h.example/cb", replyRef="r-1", seed=7, count=2)
    assert submission.echo["replyUrl"] == "https://h.example/cb"
    assert submission.echo["replyRef"] == "r-1"
    assert (submission.echo["seed"], submission.echo["count"]) == (7, 2)
    assert (submission.seed, submission.count) == (7, 2)


def test_null_and_empty_optional_fields_count_as_absent() -> None:
    submission = parse(prompt="x", model=None, ratio="", resolution=None, count="", seed=None)
    assert (submission.model.name, submission.ratio, submission.count) == (
        "seedream-4.6",
        "auto",
        4,
    )


# model


def test_unknown_model_lists_the_catalogue_in_order() -> None:
    refused(
        f"Parameter model (invalid-model) valid values: {MODELS}", prompt="x", model="invalid-model"
    )


def test_model_must_be_text() -> None:
    refused(f"Parameter model (12) valid values: {MODELS}", prompt="x", model=12)


# prompt


def test_prompt_is_required_without_references() -> None:
    refused("Parameter prompt is required", model="seedream-4.0")


def test_blank_prompt_counts_as_missing() -> None:
    refused("Parameter prompt is required", prompt="   ")


def test_prompt_optional_with_references_where_the_model_allows() -> None:
    submission = parse(model="seedream-4.0", imageRef_1=REF_A)
    assert submission.prompt is None
    assert "prompt" not in submission.echo


def test_prompt_required_even_with_references_on_nano_banana() -> None:
    refused("Parameter prompt is required", model="nano-banana", imageRef_1=REF_A)


def test_prompt_at_most_1600_characters() -> None:
    assert parse(prompt="p" * 1600).prompt == "p" * 1600
    refused(
        "Parameter prompt (1601 characters) valid values: text of at most 1600 characters",
        prompt="p" * 1601,
    )


def test_prompt_must_be_text() -> None:
    refused("Parameter prompt (42) valid values: text of at most 1600 characters", prompt=42)


# ratio and resolution


def test_unknown_ratio_lists_the_models_ratios() -> None:
    refused(f"Parameter ratio (5:4) valid values: auto, {RATIOS}", prompt="x", ratio="5:4")


def test_auto_ratio_on_a_model_without_it() -> None:
    refused(
        f"Parameter ratio (auto) valid values: {RATIOS}",
        prompt="x",
        model="seedream-3.0",
        ratio="auto",
    )


@pytest.mark.parametrize(
    ("model", "resolution", "valid"),
    [
        ("seedream-4.0", "1k", "2k, 4k"),
        ("seedream-4.5", "8k", "2k, 4k"),
        ("nano-banana", "2k", "1k"),
        ("seedream-3.0", "4k", "1k, 2k"),
    ],
)
def test_resolution_must_be_one_the_model_lists(model: str, resolution: str, valid: str) -> None:
    refused(
        f"Parameter resolution ({resolution}) valid values: {valid}",
        prompt="x",
        model=model,
        resolution=resolution,
    )


def test_auto_ratio_with_references_takes_the_ratio_nearest_the_first_one() -> None:
    submission = parse(prompt="x", imageRef_1=REF_A, imageRef_2=REF_A2)
    assert submission.fixed_ratio == "3:4"  # 685x900
    assert submission.size == (1728, 2304)


# imageRef_N


def test_references_set_input_mode_account_and_strength() -> None:
    submission = parse(prompt="x", imageRef_1=REF_A, imageRef_2=REF_A2)
    assert submission.account == "US:a@x.com"
    assert [str(ref) for ref in submission.references] == [REF_A, REF_A2]
    assert submission.echo["inputMode"] == "reference"
    assert (submission.echo["imageRef_1"], submission.echo["imageRef_2"]) == (REF_A, REF_A2)
    assert submission.echo["imageStrength"] == 0.5


def test_references_must_be_contiguous_from_1() -> None:
    message = (
        "Parameter imageRef_2 requires imageRef_1: references must be contiguous from imageRef_1"
    )
    refused(message, prompt="x", imageRef_2=REF_A)


def test_a_gap_in_the_references_is_named() -> None:
    message = (
        "Parameter imageRef_3 requires imageRef_2: references must be contiguous from imageRef_1"
    )
    refused(message, prompt="x", imageRef_1=REF_A, imageRef_3=REF_A)


def test_only_imageref_1_to_6_exist() -> None:
    message = "Parameter imageRef_7 is not supported. Valid values: imageRef_1 to imageRef_6"
    refused(message, prompt="x", imageRef_7=REF_A)


@pytest.mark.parametrize(("model", "most"), [("seedream-3.0", 1), ("nano-banana", 3)])
def test_at_most_the_models_max_refs(model: str, most: int) -> None:
    refs = {f"imageRef_{n}": REF_A for n in range(1, most + 2)}
    refused(
        f"Parameter imageRef_{most + 1} not allowed: model {model} takes at most {most} "
        "reference images",
        prompt="x",
        model=model,
        **refs,
    )


def test_six_references_on_seedream_4() -> None:
    refs = {f"imageRef_{n}": REF_A for n in range(1, 7)}
    assert len(parse(prompt="x", **refs).references) == 6


def test_a_reference_must_be_an_asset_ref() -> None:
    refused(
        f"Parameter imageRef_1 (garbage) valid values: {REF_SHAPE}",
        prompt="x",
        imageRef_1="garbage",
    )
    refused(f"Parameter imageRef_1 (5) valid values: {REF_SHAPE}", prompt="x", imageRef_1=5)


def test_all_references_on_one_account() -> None:
    refused(
        f"Parameter imageRef_2 ({REF_B}) valid values: an assetRef on account US:a@x.com, "
        "like imageRef_1",
        prompt="x",
        imageRef_1=REF_A,
        imageRef_2=REF_B,
    )


def test_a_named_account_must_match_the_references() -> None:
    refused(
        "Parameter account (US:b@x.com) valid values: US:a@x.com, the account of the references",
        prompt="x",
        imageRef_1=REF_A,
        account="US:b@x.com",
    )
    assert parse(prompt="x", imageRef_1=REF_A, account="US:a@x.com").account == "US:a@x.com"


# numbers and other fields


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (1.5, "1.5"),
        (-0.1, "-0.1"),
        ("abc", "abc"),
        (True, "true"),
        ("nan", "nan"),
        ([0.5], "[0.5]"),
    ],
)
def test_image_strength_is_a_number_from_0_to_1(value: Any, shown: str) -> None:
    refused(
        f"Parameter imageStrength ({shown}) valid values: number 0-1",
        prompt="x",
        imageStrength=value,
    )


def test_image_strength_given_is_echoed_and_strings_are_converted() -> None:
    submission = parse(prompt="x", imageStrength="0.7")
    assert submission.image_strength == 0.7
    assert submission.echo["imageStrength"] == 0.7


@pytest.mark.parametrize(
    ("name", "value", "valid"),
    [
        ("count", 0, "integer 1-4"),
        ("count", 5, "integer 1-4"),
        ("count", 2.5, "integer 1-4"),
        ("count", "two", "integer 1-4"),
        ("maxJobs", 0, "integer 1-50"),
        ("maxJobs", 51, "integer 1-50"),
        ("seed", -1, "integer 0-2147483647"),
        ("seed", 2147483648, "integer 0-2147483647"),
        ("seed", 10**400, "integer 0-2147483647"),
    ],
)
def test_integer_parameters(name: str, value: Any, valid: str) -> None:
    shown = str(value) if len(str(value)) <= 100 else str(value)[:99] + "…"
    refused(f"Parameter {name} ({shown}) valid values: {valid}", prompt="x", **{name: value})


def test_integers_arrive_as_strings_from_multipart() -> None:
    submission = parse(prompt="x", count="2", maxJobs="3", seed="11", imageStrength="1")
    assert (submission.count, submission.max_jobs, submission.seed) == (2, 3, 11)
    assert submission.image_strength == 1.0


def test_account_must_be_an_account_id() -> None:
    refused(
        "Parameter account (bad) valid values: an account id REGION:name", prompt="x", account="bad"
    )


@pytest.mark.parametrize(
    "url",
    ["ftp://h.example/x", "not a url", "https://", "http://h.example:0/", "javascript:alert(1)"],
)
def test_reply_url_must_be_http_or_https(url: str) -> None:
    refused(
        f"Parameter replyUrl ({url}) valid values: an http or https URL of at most 1024 characters",
        prompt="x",
        replyUrl=url,
    )


def test_reply_url_at_most_1024_characters_and_long_values_are_cut_in_the_message() -> None:
    url = "https://h.example/" + "a" * 1007
    assert len(url) == 1025
    refused(
        f"Parameter replyUrl ({url[:99]}…) valid values: an http or https URL of at most 1024 "
        "characters",
        prompt="x",
        replyUrl=url,
    )
    assert parse(prompt="x", replyUrl=url[:1024]).reply_url == url[:1024]


def test_reply_ref_at_most_1024_characters() -> None:
    refused(
        f"Parameter replyRef ({'r' * 99}…) valid values: text of at most 1024 characters",
        prompt="x",
        replyRef="r" * 1025,
    )


# no input gives anything but a 400


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
field_names = st.sampled_from(IMAGE_FIELDS) | st.text(max_size=10)


@given(
    st.dictionaries(
        field_names,
        json_values | ASSET_REFS | st.sampled_from([REF_A, "1:1", "2k", "nano-banana"]),
    )
)
def test_any_fields_give_a_submission_or_a_400(fields: dict[str, Any]) -> None:
    try:
        submission = parse_image_submission(fields, CATALOGUE)
    except BadRequest as error:
        refusal = error
    else:
        width, height = submission.size  # what admission computes next must work too
        assert width > 0
        assert height > 0
        return
    assert refusal.status == 400
    assert refusal.message.startswith("Parameter ")


@given(ref=ASSET_REFS, model=st.sampled_from(CATALOGUE.names))
def test_any_reference_gives_a_sized_submission_or_a_400(ref: str, model: str) -> None:
    try:
        submission = parse_image_submission(
            {"prompt": "x", "model": model, "imageRef_1": ref}, CATALOGUE
        )
    except BadRequest as error:
        assert error.message.startswith("Parameter imageRef_1 (")  # noqa: PT017
        return
    width, height = submission.size  # `auto` follows the reference's own numbers
    assert width > 0
    assert height > 0
