"""Every example the spec documents succeeds as shown, against a real instance.

The spec's request examples, its parameters' examples and defaults, and the sample a client
builds from a body schema's own examples and defaults (what Swagger UI pre-fills when it has
no example) are sent in the walkthrough's order on a fresh database, as the spec's description
says, and each must get its operation's documented success status and headers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import jsonschema
import pytest
import requests
from flask.testing import FlaskClient

from tests.support import Instance

# The walkthrough: the order in which the examples are to be run (DESCRIPTION in
# taskapp/openapi.py). The streams are left out: they never end.
WALKTHROUGH = [
    "create_task",
    "list_tasks",
    "get_task",
    "update_task",
    "create_conversation",
    "list_conversations",
    "get_conversation",
    "update_conversation",
    "cancel_task",
    "retry_task",
    "prune_tasks",
    "list_queues",
    "configure_queue",
    "get_queue",
    "pause_queue",
    "resume_queue",
    "configure_key",
    "get_key",
    "list_keys",
    "delete_key",
    "delete_task",
    "problem_type",
    "health",
    "livez",
    "readyz",
    "status",
    "metrics",
]
STREAMS = {"events", "websocket"}
METHODS = ("get", "put", "post", "delete", "patch")


@pytest.fixture
def live(instances: Callable[..., Instance]) -> Iterator[tuple[str, dict[str, Any]]]:
    """A fresh database's instance that claims nothing (so a task stays as the walkthrough
    leaves it), and its live spec."""
    url = instances(WORKER_ENABLED=0).url
    spec = requests.get(f"{url}/apispec_1.json", timeout=10).json()
    yield url, spec


def operations(spec: dict[str, Any]) -> dict[str, tuple[str, str, dict[str, Any], list[Any]]]:
    """operationId -> (path, method, operation, its parameters and its path's)."""
    found = {}
    for path, item in spec["paths"].items():
        for method in METHODS:
            if method in item:
                operation = item[method]
                parameters = [*item.get("parameters", []), *operation.get("parameters", [])]
                found[operation["operationId"]] = (path, method, operation, parameters)
    return found


def resolve(spec: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


def sample(spec: dict[str, Any], schema: dict[str, Any]) -> Any:
    """The value a client builds from a schema (Swagger UI's rule): a field's example, else its
    default, else its first enum value, else the sample of what it is made of."""
    schema = resolve(spec, schema)
    for key in ("example", "default"):
        if key in schema:
            return schema[key]
    if "enum" in schema:
        return schema["enum"][0]
    if "allOf" in schema:
        return sample(spec, schema["allOf"][0])
    if schema.get("type") == "array":
        return [sample(spec, schema["items"])]
    if schema.get("type") == "object":
        return {name: sample(spec, prop) for name, prop in schema.get("properties", {}).items()}
    raise AssertionError(f"no example, default or enum to build a sample from: {schema}")


def as_validator(spec: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """An OpenAPI 3.0 schema as JSON Schema: `nullable` as a type that admits null."""
    schema = resolve(spec, schema)
    converted = {k: v for k, v in schema.items() if k not in {"nullable", "example"}}
    if "properties" in schema:
        converted["properties"] = {
            name: as_validator(spec, prop) for name, prop in schema["properties"].items()
        }
    if "items" in schema:
        converted["items"] = as_validator(spec, schema["items"])
    if "allOf" in schema:
        converted["allOf"] = [as_validator(spec, part) for part in schema["allOf"]]
    if schema.get("nullable"):
        return {"anyOf": [converted, {"type": "null"}]}
    return converted


def success(operation: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """The operation's documented success: its one 2xx status and that response."""
    ((code, response),) = [
        (code, response) for code, response in operation["responses"].items() if code[0] == "2"
    ]
    return int(code), response


def requests_of(
    spec: dict[str, Any], path: str, operation: dict[str, Any], parameters: list[Any]
) -> list[tuple[str, dict[str, Any]]]:
    """What the spec shows for an operation: (label, requests.request kwargs) for each body
    example, and for the sample of its body schema; one request for an operation without a
    body. Parameters take their example, else their default (as Swagger UI pre-fills them)."""
    url_path, query, headers = path, {}, {}
    for parameter in parameters:
        shown = parameter.get("example", parameter.get("schema", {}).get("default"))
        if parameter["in"] == "path":
            assert shown is not None, f"{path}: path parameter {parameter['name']} shows no example"
            url_path = url_path.replace(f"{{{parameter['name']}}}", str(shown))
        elif shown is not None and parameter["in"] == "query":
            query[parameter["name"]] = shown
        elif shown is not None and parameter["in"] == "header":
            headers[parameter["name"]] = str(shown)
    base = {"url": url_path, "params": query, "headers": headers}
    if "requestBody" not in operation:
        return [("no body", base)]
    content = operation["requestBody"]["content"]["application/json"]
    assert content.get("examples"), f"{operation['operationId']} documents no body example"
    shown_bodies = [(name, example["value"]) for name, example in content["examples"].items()]
    shown_bodies.append(("schema sample", sample(spec, content["schema"])))
    return [(label, {**base, "json": body}) for label, body in shown_bodies]


@pytest.fixture
def spec(client: FlaskClient) -> dict[str, Any]:
    return client.get("/apispec_1.json").get_json()


def test_the_walkthrough_covers_every_operation(spec: dict[str, Any]) -> None:
    assert sorted(WALKTHROUGH) == sorted(set(operations(spec)) - STREAMS)


def test_every_documented_example_gets_its_documented_status(
    live: tuple[str, dict[str, Any]],
) -> None:
    url, spec = live
    found = operations(spec)
    ran = []
    for operation_id in WALKTHROUGH:
        path, method, operation, parameters = found[operation_id]
        status, documented = success(operation)
        for label, kwargs in requests_of(spec, path, operation, parameters):
            sent = {**kwargs, "url": url + kwargs["url"]}
            response = requests.request(method, timeout=10, **sent)
            what = f"{operation_id} ({label}): {method.upper()} {kwargs['url']}"
            assert response.status_code == status, (what, response.status_code, response.text)
            for header in documented.get("headers", {}):
                assert header in response.headers, (what, header)
            media_types = documented.get("content", {})
            if media_types:
                assert response.headers["Content-Type"].split(";")[0] in media_types, what
            if "application/json" in media_types:
                schema = as_validator(spec, media_types["application/json"]["schema"])
                jsonschema.Draft4Validator(schema).validate(response.json())
            ran.append(what)
    # 4 + 2 + 1 + 2 + 1 + 2 + 1 body examples, and a schema sample for each of the 7 bodies.
    assert len(ran) == len(WALKTHROUGH) - 7 + 13 + 7


def test_every_body_field_shows_a_value_its_schema_accepts(spec: dict[str, Any]) -> None:
    """A field's own example (or default) obeys its rules (minimum, pattern, ...): Swagger UI
    shows it in the schema and puts it in the samples it builds."""
    schemas = spec["components"]["schemas"]
    bodies = {
        operation["requestBody"]["content"]["application/json"]["schema"]["$ref"].rsplit("/")[-1]
        for _, _, operation, _ in operations(spec).values()
        if "requestBody" in operation
    }
    assert bodies == {
        "TaskCreate",
        "TaskUpdate",
        "ConversationCreate",
        "ConversationUpdate",
        "QueueUpdate",
        "KeyUpdate",
        "TaskPrune",
    }
    for name in sorted(bodies | {"RateLimit"}):
        for field, prop in schemas[name]["properties"].items():
            value = sample(spec, prop)
            jsonschema.Draft4Validator(as_validator(spec, prop)).validate(value)
            if "example" in prop or "default" in prop:
                continue
            assert "allOf" in prop or "enum" in prop or prop.get("type") == "array", (
                f"{name}.{field} shows no example"
            )
