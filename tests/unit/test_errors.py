"""The error table: one slug, status and exit code per kind."""

from __future__ import annotations

import pytest

from fleetgate.errors import (
    ERROR_TABLE,
    EXIT_OK,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    FleetgateError,
    InvalidRequest,
    NotFound,
    kind_for_slug,
)


def test_slugs_are_unique() -> None:
    slugs = [cls.kind.slug for cls in ERROR_TABLE]
    assert len(slugs) == len(set(slugs))


def test_every_error_class_is_in_the_table() -> None:
    def subclasses(cls: type[FleetgateError]) -> set[type[FleetgateError]]:
        found = {cls}
        for sub in cls.__subclasses__():
            if sub.__module__ == "fleetgate.errors":
                found |= subclasses(sub)
        return found

    assert subclasses(FleetgateError) <= set(ERROR_TABLE)


def test_every_class_has_its_own_kind() -> None:
    kinds = [cls.kind for cls in ERROR_TABLE]
    assert len({id(k) for k in kinds}) == len(kinds)


@pytest.mark.parametrize("cls", ERROR_TABLE, ids=lambda c: c.__name__)
def test_kind_for_slug_round_trip(cls: type[FleetgateError]) -> None:
    assert kind_for_slug(cls.kind.slug) is cls.kind


@pytest.mark.parametrize("slug", ["no-such-slug", "", "NOT-FOUND"])
def test_unknown_slug_is_internal(slug: str) -> None:
    kind = kind_for_slug(slug)
    assert kind is FleetgateError.kind
    assert kind.slug == "internal"
    assert kind.http_status == 500


@pytest.mark.parametrize("cls", ERROR_TABLE, ids=lambda c: c.__name__)
def test_http_status_is_an_error_status(cls: type[FleetgateError]) -> None:
    assert 400 <= cls.kind.http_status <= 599


@pytest.mark.parametrize("cls", ERROR_TABLE, ids=lambda c: c.__name__)
def test_exit_code_is_distinct_from_cli_reserved_codes(cls: type[FleetgateError]) -> None:
    # A script must be able to tell "the server said X" from "usage error" and "unreachable".
    assert 1 <= cls.kind.exit_code <= 125
    assert cls.kind.exit_code not in {EXIT_OK, EXIT_USAGE, EXIT_UNREACHABLE}


@pytest.mark.parametrize("cls", ERROR_TABLE, ids=lambda c: c.__name__)
def test_slug_and_title_are_presentable(cls: type[FleetgateError]) -> None:
    assert cls.kind.slug
    assert cls.kind.slug == cls.kind.slug.lower()
    assert " " not in cls.kind.slug
    assert cls.kind.title


def test_error_carries_detail_and_field() -> None:
    error = InvalidRequest("bad id", field="id")
    assert error.detail == "bad id"
    assert error.field == "id"
    assert str(error) == "bad id"
    assert NotFound("gone").field is None
    assert isinstance(error, FleetgateError)
