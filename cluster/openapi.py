"""What /openapi.json says beyond FastAPI's defaults: the chat request body (read by hand, for the
size limit), the X-Session-Id header, the bearer scheme and every error response with its schema."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from lessserve.cluster.openai_types import SESSION_ID_PATTERN, ChatCompletionRequest, ErrorResponse
from lessserve.cluster.responses_types import ResponsesRequest

REF = "#/components/schemas/{model}"


def _error(description: str, retry: bool = False) -> dict:
    out = {"description": description, "model": ErrorResponse}
    if retry:
        out["headers"] = {"Retry-After": {"description": "seconds to wait before retrying",
                                          "schema": {"type": "integer"}}}
    return out


ERRORS = {
    400: _error("bad input: malformed JSON, a wrong type or value (the message names the field), too long"),
    401: _error("missing or invalid API key (when the server has keys)"),
    404: _error("unknown model or session (another key's session is reported the same way)"),
    413: _error("request body over the server's limit"),
    503: _error("busy (every session slot in use) or a dependency down: retry after Retry-After", retry=True),
}
SESSION_HEADER = {"name": "X-Session-Id", "in": "header", "required": False,
                  "description": "the conversation's id: its compressed cache stays on one worker between turns",
                  "schema": {"type": "string", "pattern": SESSION_ID_PATTERN}}
CHAT_EXTRA = {
    "parameters": [SESSION_HEADER],
    "responses": {"200": {"description": "the completion (application/json), or with stream=true server-sent "
                                         "chat.completion.chunk events ending with `data: [DONE]`",
                          "content": {"application/json": {"schema": {"type": "object"}},
                                      "text/event-stream": {"schema": {"type": "string"}}}}},
    "requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": REF.format(model="ChatCompletionRequest")}}}},
}


RESPONSES_EXTRA = {
    "requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": REF.format(model="ResponsesRequest")}}}},
    "responses": {"200": {"description": "the response object (application/json), or with stream=true server-sent "
                                         "events response.created ... response.output_text.delta ... "
                                         "response.completed",
                          "content": {"application/json": {"schema": {"type": "object"}},
                                      "text/event-stream": {"schema": {"type": "string"}}}}},
}


def install(app: FastAPI, model_names: list[str] | None = None) -> None:
    """Replace app.openapi with one that adds the request schemas and the security scheme;
    `model_names`: the models this deployment serves (documented as the `model` field's enum)."""
    app.openapi_schema = None

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        for model in (ChatCompletionRequest, ResponsesRequest):
            body = model.model_json_schema(ref_template=REF)
            schemas.update(body.pop("$defs", {}))
            if model_names:
                body["properties"]["model"]["enum"] = list(model_names)
            schemas[model.__name__] = body
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer",
                                                           "description": "an API key, when the server has keys"}}
        doc["security"] = [{"bearer": []}, {}]  # optional: a server without keys takes anonymous requests
        app.openapi_schema = doc
        return doc

    app.openapi = openapi
