"""What /openapi.json says beyond what FastAPI reads from the code (the request bodies come from
their pydantic models): the X-Session-Id header, the two content types of a streamable answer, every
error response with its schema, the bearer scheme, and the served model names."""

from __future__ import annotations

from fastapi import FastAPI

from lessserve.cluster.openai_types import ErrorResponse
from lessserve.cluster.protocol import SESSION_ID_PATTERN


def _error(description: str, retry: bool = False) -> dict:
    out = {"description": description, "model": ErrorResponse}
    if retry:
        out["headers"] = {"Retry-After": {"description": "seconds to wait before retrying",
                                          "schema": {"type": "integer"}}}
    return out


ERRORS = {
    400: _error("bad input: malformed JSON, a wrong type or value (the message names the field), too long"),
    401: _error("missing or invalid API key (when the server has keys)"),
    403: _error("the API key holds as many sessions or stored responses (or bytes) as its quota allows"),
    404: _error("unknown model or session (another key's session is reported the same way)"),
    413: _error("request body over the server's limit"),
    429: _error("the API key has as many turns in flight as its quota allows: retry after Retry-After",
                retry=True),
    503: _error("busy (every session slot in use) or a dependency down: retry after Retry-After", retry=True),
}
SESSION_HEADER = {"name": "X-Session-Id", "in": "header", "required": False,
                  "description": "the conversation's id: its compressed cache stays on one worker between turns",
                  "schema": {"type": "string", "pattern": SESSION_ID_PATTERN}}


def _streamable(description: str) -> dict:
    return {"200": {"description": description, "content": {"application/json": {"schema": {"type": "object"}},
                                                            "text/event-stream": {"schema": {"type": "string"}}}}}


CHAT_EXTRA = {
    "parameters": [SESSION_HEADER],
    "responses": _streamable("the completion (application/json), or with stream=true server-sent "
                             "chat.completion.chunk events ending with `data: [DONE]`"),
}
RESPONSES_EXTRA = {
    "responses": _streamable("the response object (application/json), or with stream=true server-sent events "
                             "response.created ... response.output_text.delta ... response.completed"),
}
REQUEST_BODIES = ("ChatCompletionRequest", "ResponsesRequest")


def install_openapi(app: FastAPI, model_names: list[str]) -> None:
    """app.openapi adds, to FastAPI's document, the served models (the bodies' `model` enum) and the
    security scheme, and drops FastAPI's 422 answers: every validation error is a 400 here."""
    app.openapi_schema = None
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        doc = generate()
        schemas = doc["components"]["schemas"]
        for name in REQUEST_BODIES:
            schemas[name]["properties"]["model"]["enum"] = list(model_names)
        for path in doc["paths"].values():
            for op in path.values():
                op.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer",
                                                           "description": "an API key, when the server has keys"}}
        doc["security"] = [{"bearer": []}, {}]  # optional: a server without keys takes anonymous requests
        app.openapi_schema = doc
        return doc

    app.openapi = openapi
