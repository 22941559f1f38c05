"""The API reference page: the OpenAPI document rendered into one static HTML page.

No script and no external asset (no CDN, no font, no image): it reads offline, in any browser, on
a server with no internet access, and under a `default-src 'none'` policy. It shows what a client
implementer needs: each operation with its parameters, body and responses (status, error codes,
headers, schema), then every schema. Descriptions are CommonMark in the document; only what this
document uses is rendered (paragraphs, lists, `code`, **strong**), everything else is escaped.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Iterator, Mapping
from typing import Any

__all__ = ["render"]

_METHODS = ("get", "head", "post", "put", "patch", "delete", "options")
_REF = "#/components/"

_STYLE = """
body { font: 15px/1.5 system-ui, sans-serif; margin: 0 auto; max-width: 70rem; padding: 1rem 2rem;
       color: #1b1f24; }
h1 { margin-bottom: 0; } h2 { border-bottom: 1px solid #ccd; margin-top: 2.5rem; }
h3 { margin: 2rem 0 .3rem; font-size: 1.1rem; } h4 { margin: 1rem 0 .3rem; }
code, pre { font: 13px/1.4 ui-monospace, monospace; background: #f3f4f6; border-radius: 3px; }
code { padding: 0 .2em; } pre { padding: .6rem; overflow-x: auto; }
table { border-collapse: collapse; width: 100%; margin: .3rem 0; }
th, td { border: 1px solid #dde; padding: .25rem .5rem; text-align: left; vertical-align: top; }
th { background: #f6f7f9; }
.method { display: inline-block; min-width: 4.5rem; font-weight: 700; text-transform: uppercase; }
.get { color: #1a7f37; } .post { color: #0550ae; } .put, .patch { color: #9a6700; }
.delete { color: #cf222e; } .head, .options { color: #6e7781; }
.muted { color: #57606a; } nav ul { columns: 2; } a { color: #0550ae; }
"""


def render(spec: Mapping[str, Any]) -> str:
    """The whole page for `spec` (an OpenAPI 3.1 document as JSON data)."""
    info = spec.get("info", {})
    title = f"{info.get('title', 'API')} {info.get('version', '')}".strip()
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)} — API reference</title><style>{_STYLE}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f'<p class="muted">{_e(info.get("summary", ""))} OpenAPI {_e(spec.get("openapi", ""))};'
        ' the machine-readable document is <a href="/v1/openapi.json">/v1/openapi.json</a>.</p>',
        _markdown(info.get("description", "")),
        *_contents(spec),
        *_operations(spec),
        *_schemas(spec),
        "</body></html>",
    ]
    return "\n".join(parts)


def _operations_by_tag(spec: Mapping[str, Any]) -> dict[str, list[tuple[str, str, Any]]]:
    groups: dict[str, list[tuple[str, str, Any]]] = {
        tag["name"]: [] for tag in spec.get("tags", [])
    }
    for path, item in spec.get("paths", {}).items():
        for method in _METHODS:
            if method in item:
                operation = item[method]
                tag = (operation.get("tags") or ["other"])[0]
                groups.setdefault(tag, []).append((path, method, operation))
    return groups


def _anchor(method: str, path: str, operation: Mapping[str, Any]) -> str:
    return "op-" + str(operation.get("operationId") or f"{method}-{path}")


def _contents(spec: Mapping[str, Any]) -> Iterator[str]:
    yield "<nav><h2>Contents</h2><ul>"
    for tag, operations in _operations_by_tag(spec).items():
        for path, method, operation in operations:
            yield (
                f'<li><a href="#{_e(_anchor(method, path, operation))}">'
                f'<span class="method {method}">{method}</span><code>{_e(path)}</code></a>'
                f' <span class="muted">{_e(tag)}</span></li>'
            )
    yield '<li><a href="#schemas">Schemas</a></li></ul></nav>'


def _operations(spec: Mapping[str, Any]) -> Iterator[str]:
    tags = {tag["name"]: tag.get("description", "") for tag in spec.get("tags", [])}
    for tag, operations in _operations_by_tag(spec).items():
        if not operations:
            continue
        yield f"<h2>{_e(tag)}</h2>{_markdown(tags.get(tag, ''))}"
        for path, method, operation in operations:
            shared = spec["paths"][path].get("parameters", [])
            yield from _operation(spec, path, method, operation, shared)


def _operation(
    spec: Mapping[str, Any],
    path: str,
    method: str,
    operation: Mapping[str, Any],
    shared: list[Any],
) -> Iterator[str]:
    yield (
        f'<section id="{_e(_anchor(method, path, operation))}"><h3>'
        f'<span class="method {method}">{method}</span> <code>{_e(path)}</code>'
        f" — {_e(operation.get('summary', ''))}</h3>"
    )
    yield f'<p class="muted">Who: {_e(_security(spec, operation))}</p>'
    yield _markdown(operation.get("description", ""))
    parameters = [_resolve(spec, p) for p in [*shared, *operation.get("parameters", [])]]
    if parameters:
        yield "<h4>Parameters</h4><table>"
        yield "<tr><th>name</th><th>in</th><th>type</th><th>about</th></tr>"
        for parameter in parameters:
            required = " <strong>required</strong>" if parameter.get("required") else ""
            yield (
                f"<tr><td><code>{_e(parameter['name'])}</code>{required}</td>"
                f"<td>{_e(parameter['in'])}</td>"
                f"<td>{_type(parameter.get('schema', {}))}</td>"
                f"<td>{_markdown(parameter.get('description', ''), inline=True)}</td></tr>"
            )
        yield "</table>"
    if "requestBody" in operation:
        body = _resolve(spec, operation["requestBody"])
        yield "<h4>Request body</h4>" + _markdown(body.get("description", ""))
        yield from _content(body.get("content", {}))
    yield "<h4>Responses</h4><table><tr><th>status</th><th>about</th><th>body</th></tr>"
    for status, reference in operation.get("responses", {}).items():
        response = _resolve(spec, reference)
        headers = ", ".join(f"<code>{_e(h)}</code>" for h in response.get("headers", {}))
        shown = "<br>".join(
            f"<code>{_e(media)}</code> {_type(content.get('schema', {}))}"
            for media, content in response.get("content", {}).items()
        )
        yield (
            f"<tr><td><strong>{_e(status)}</strong></td>"
            f"<td>{_markdown(response.get('description', ''), inline=True)}"
            f"{'<br>headers: ' + headers if headers else ''}</td><td>{shown}</td></tr>"
        )
    yield "</table>"
    for status, reference in operation.get("responses", {}).items():
        for media, content in _resolve(spec, reference).get("content", {}).items():
            if "example" in content:
                example = json.dumps(content["example"], indent=2, ensure_ascii=False)
                yield (
                    f"<details><summary>Example: {_e(status)} <code>{_e(media)}</code></summary>"
                    f"<pre>{_e(example)}</pre></details>"
                )
    yield "</section>"


def _content(content: Mapping[str, Any]) -> Iterator[str]:
    for media, body in content.items():
        yield f"<p><code>{_e(media)}</code> {_type(body.get('schema', {}))}</p>"
        if "example" in body:
            yield f"<pre>{_e(json.dumps(body['example'], indent=2, ensure_ascii=False))}</pre>"


def _schemas(spec: Mapping[str, Any]) -> Iterator[str]:
    yield '<h2 id="schemas">Schemas</h2>'
    for name, schema in spec.get("components", {}).get("schemas", {}).items():
        yield f'<section id="schema-{_e(name)}"><h3><code>{_e(name)}</code></h3>'
        direction = schema.get("x-direction")
        if direction:
            yield f'<p class="muted">WebSocket control message, {_e(direction)}.</p>'
        yield _markdown(schema.get("description", ""))
        properties = schema.get("properties")
        if properties:
            required = set(schema.get("required", []))
            yield "<table><tr><th>member</th><th>type</th><th>about</th></tr>"
            for member, sub in properties.items():
                mark = " <strong>required</strong>" if member in required else ""
                yield (
                    f"<tr><td><code>{_e(member)}</code>{mark}</td><td>{_type(sub)}</td>"
                    f"<td>{_markdown(sub.get('description', ''), inline=True)}</td></tr>"
                )
            yield "</table>"
        else:
            yield f"<p>{_type(schema)}</p>"
        yield "</section>"


def _security(spec: Mapping[str, Any], operation: Mapping[str, Any]) -> str:
    requirements = operation.get("security", spec.get("security", []))
    if not requirements:
        return "anyone, no token"
    schemes = spec.get("components", {}).get("securitySchemes", {})
    shown = []
    for requirement in requirements:
        if not requirement:
            shown.append("no credentials at the upgrade (authenticated in band)")
        for name in requirement:
            scheme = schemes.get(name, {})
            if scheme.get("type") == "http":
                shown.append(f"Authorization: {str(scheme.get('scheme', '')).title()} token")
            elif scheme.get("type") == "apiKey":
                shown.append(f"a token as the {scheme.get('name')} {scheme.get('in')} parameter")
            else:
                shown.append(name)
    return " or ".join(shown)


def _resolve(spec: Mapping[str, Any], item: Mapping[str, Any]) -> Mapping[str, Any]:
    while "$ref" in item and str(item["$ref"]).startswith("#/"):
        target: Any = spec
        for part in str(item["$ref"])[2:].split("/"):
            target = target[part]
        item = target
    return item


def _type(schema: Any) -> str:
    """A schema as a short type expression, with links to the named schemas."""
    if not isinstance(schema, Mapping) or not schema:
        return "any"
    if "$ref" in schema:
        ref = str(schema["$ref"])
        name = ref.rsplit("/", 1)[-1]
        link = f'<a href="#schema-{_e(name)}">{_e(name)}</a>' if ref.startswith(_REF) else _e(ref)
        narrowed = schema.get("properties", {}).get("code", {})
        codes = narrowed.get("enum") or ([narrowed["const"]] if "const" in narrowed else [])
        return link + (f" (<code>{_e(', '.join(map(str, codes)))}</code>)" if codes else "")
    for key in ("oneOf", "anyOf"):
        if key in schema:
            return " | ".join(_type(sub) for sub in schema[key])
    if "const" in schema:
        return f"<code>{_e(json.dumps(schema['const']))}</code>"
    if "enum" in schema:
        return "one of " + ", ".join(f"<code>{_e(json.dumps(v))}</code>" for v in schema["enum"])
    kinds = schema.get("type", [])
    kinds = [kinds] if isinstance(kinds, str) else list(kinds)
    shown = []
    for kind in kinds:
        if kind == "array":
            shown.append(f"array of {_type(schema.get('items', {}))}")
        elif kind == "object" and isinstance(schema.get("additionalProperties"), Mapping):
            shown.append(f"map of {_type(schema['additionalProperties'])}")
        elif kind == "string" and schema.get("format") == "binary":
            shown.append("bytes")
        else:
            shown.append(_e(kind))
    text = " | ".join(shown) or "any"
    limits = [
        f"{_e(key)} {_e(json.dumps(schema[key]))}"
        for key in ("minimum", "maximum", "minLength", "maxLength", "maxItems", "pattern")
        if key in schema
    ]
    return text + (f" <span class='muted'>({'; '.join(limits)})</span>" if limits else "")


_CODE = re.compile(r"`([^`]+)`")
_STRONG = re.compile(r"\*\*([^*]+)\*\*")


def _inline(text: str) -> str:
    escaped = _e(text)
    escaped = _CODE.sub(r"<code>\1</code>", escaped)
    return _STRONG.sub(r"<strong>\1</strong>", escaped)


def _markdown(text: str, *, inline: bool = False) -> str:
    """Paragraphs and `- ` lists of CommonMark, inline code and strong; all else is text."""
    if not text:
        return ""
    if inline:
        return _inline(" ".join(text.split()))
    out = []
    for block in re.split(r"\n\s*\n", text.strip()):
        lines = block.splitlines()
        if all(line.startswith(("- ", "  ")) for line in lines) and lines[0].startswith("- "):
            items: list[str] = []
            for line in lines:
                if line.startswith("- "):
                    items.append(line[2:])
                else:
                    items[-1] += " " + line.strip()
            out.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in items) + "</ul>")
        else:
            out.append(f"<p>{_inline(' '.join(line.strip() for line in lines))}</p>")
    return "\n".join(out)


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)
