"""The shared vocabulary: an origin's text form, the one storage keeps."""

from __future__ import annotations

import pytest

from fieldsync.records import Origin, OriginKind


@pytest.mark.parametrize(
    ("origin", "text"),
    [
        (Origin(OriginKind.DEVICE, "tina-phone"), "device:tina-phone"),
        (Origin(OriginKind.YWS, "c3-0a1b2c3d"), "yws:c3-0a1b2c3d"),
        (Origin(OriginKind.REST), "rest"),
        (Origin(OriginKind.RULES), "rules"),
        (Origin(OriginKind.ADAPTER, "erp:north"), "adapter:erp:north"),
    ],
)
def test_an_origin_reads_back_from_its_text(origin: Origin, text: str) -> None:
    assert str(origin) == text
    assert Origin.parse(text) == origin


@pytest.mark.parametrize(
    ("text", "origin"),
    [
        ("server:rules", Origin(OriginKind.RULES)),
        ("server", Origin(OriginKind.RULES)),
        ("session:c1-ab12cd34", Origin(OriginKind.DEVICE, "c1-ab12cd34")),
    ],
)
def test_the_text_of_untyped_origins_still_reads(text: str, origin: Origin) -> None:
    assert Origin.parse(text) == origin


@pytest.mark.parametrize("text", ["", "nobody:x", "Device:x", ":x"])
def test_an_unknown_kind_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="is not a valid OriginKind"):
        Origin.parse(text)
