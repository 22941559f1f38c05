"""The contract as the tests hold both sides to it: the committed OpenAPI document
(`openapi/fieldsync.yaml`), made strict, and the validators built from it.

Strict: every object schema that lists its members and says nothing of others gets
`additionalProperties: false`. The published document leaves objects open, since clients ignore
members they do not know (DESIGN.md §3) and the server may add some; the tests close them, so that
a member the server sends and the document does not describe fails here, and the document is
updated in the same change.
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import orjson
from openapi_core import Config, OpenAPI
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from fieldsync.api import load_spec

SPEC_PATH = Path(__file__).resolve().parents[1] / "openapi" / "fieldsync.yaml"
SPEC_URI = "urn:fieldsync:openapi"
METHODS = ("get", "head", "post", "put", "patch", "delete", "options")
# Bodies that are bytes, not JSON: the validators see them as (latin-1) text, the `string` the
# document gives them.
BINARY_TYPES = (
    "application/offset+octet-stream",
    "image/jpeg",
    "image/png",
    "image/webp",
    "application/pdf",
    "text/javascript",  # the dashboard's files
    "text/css",
)


def committed() -> dict[str, Any]:
    """The committed document, as the server converts it (a fresh copy)."""
    return load_spec(SPEC_PATH.read_text("utf-8"))


def strict(spec: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `spec` whose described objects admit no other members."""
    closed = copy.deepcopy(dict(spec))

    def close(node: Any) -> None:
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and "$ref" not in node  # a reference narrowed here: the target is closed
            ):
                node["additionalProperties"] = False
            for key, value in node.items():
                if key not in ("example", "examples"):  # data, not schemas
                    close(value)
        elif isinstance(node, list):
            for value in node:
                close(value)

    close(closed.get("components", {}).get("schemas", {}))
    for item in closed.get("paths", {}).values():
        close(item)
    close(closed.get("components", {}).get("responses", {}))
    close(closed.get("components", {}).get("parameters", {}))
    return closed


@functools.cache
def strict_spec() -> dict[str, Any]:
    return strict(committed())


def ndjson(data: bytes) -> list[Any]:
    return [orjson.loads(line) for line in data.splitlines() if line.strip()]


def openapi(spec: Mapping[str, Any] | None = None) -> OpenAPI:
    """openapi-core's validator of `spec` (the strict committed document by default)."""
    deserializers: dict[str, Any] = {
        "application/x-ndjson": ndjson,
        "application/jsonl": ndjson,
        "application/problem+json": orjson.loads,  # JSON by its +json suffix (RFC 6839)
    }
    deserializers.update({media: _latin1 for media in BINARY_TYPES})
    config = Config(extra_media_type_deserializers=deserializers)
    return OpenAPI.from_dict(dict(spec or strict_spec()), config=config)


def _latin1(data: bytes) -> str:
    return data.decode("latin-1")


def registry(spec: Mapping[str, Any] | None = None) -> Registry[Any]:
    resource: Resource[Any] = Resource.from_contents(
        dict(spec or strict_spec()), default_specification=DRAFT202012
    )
    registry: Registry[Any] = Registry().with_resource(SPEC_URI, resource)
    return registry


def schema_validator(
    schema: Mapping[str, Any], spec: Mapping[str, Any] | None = None
) -> jsonschema.Draft202012Validator:
    """A JSON Schema 2020-12 validator of `schema`, whose `#/components/…` references resolve
    in `spec` (OpenAPI 3.1 schemas are 2020-12 schemas)."""
    rebased = _rebase(schema)
    return jsonschema.Draft202012Validator(rebased, registry=registry(spec))


def component(name: str, spec: Mapping[str, Any] | None = None) -> jsonschema.Draft202012Validator:
    return schema_validator({"$ref": f"#/components/schemas/{name}"}, spec)


def _rebase(node: Any) -> Any:
    """Local references of a schema taken out of the document, made to point into it."""
    if isinstance(node, dict):
        return {
            key: (
                SPEC_URI + value
                if key == "$ref" and isinstance(value, str) and value.startswith("#/")
                else _rebase(value)
            )
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [_rebase(value) for value in node]
    return node


def operations(spec: Mapping[str, Any] | None = None) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(METHOD, path, operation) of every operation of the document."""
    for path, item in (spec or strict_spec())["paths"].items():
        for method in METHODS:
            if method in item:
                yield method.upper(), path, item[method]


def resolve(node: Any, spec: Mapping[str, Any] | None = None) -> Any:
    while isinstance(node, dict) and str(node.get("$ref", "")).startswith("#/"):
        target: Any = spec or strict_spec()
        for part in node["$ref"][2:].split("/"):
            target = target[part]
        node = target
    return node


def dumps(value: Any) -> str:
    return json.dumps(value, indent=1, ensure_ascii=False, default=repr)[:2000]


@functools.cache
def controls(direction: str) -> dict[str, jsonschema.Draft202012Validator]:
    """The validator of each control message type sent in `direction`, by type."""
    return {
        schema["properties"]["type"]["const"]: component(name)
        for name, schema in strict_spec()["components"]["schemas"].items()
        if schema.get("x-direction") == direction
    }


def server_control_problems(message: Mapping[str, Any]) -> list[str]:
    """What is wrong with a control message the server sends (nothing: [])."""
    validator = controls("server-to-client").get(str(message.get("type")))
    if validator is None:
        return [f"no control message of type {message.get('type')!r}"]
    return [
        f"{message['type']} at {list(e.absolute_path)}: {e.message}"
        for e in validator.iter_errors(dict(message))
    ]
