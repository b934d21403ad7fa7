"""The operations API's OpenAPI document, generated from the api handler's routes.

Regenerate the committed copy with::

    .venv/bin/python -m spotguard_tools.openapi_doc > docs/openapi.json

(tests/unit/test_api_validation.py fails while docs/openapi.json is not current.)
"""

from __future__ import annotations

import json
import sys

from spotguard_core.ops_models import ErrorResponse
from spotguard_functions import api

API_TITLE = "spotguard operations API"
API_VERSION = "1.0.0"
DESCRIPTION = (
    "Operations API of spotguard. Every request must be signed with AWS SigV4 "
    "(API Gateway IAM authorization, service 'execute-api')."
)
_ERROR_REF = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}


def openapi_json() -> str:
    """The document, with the answers this API gives that Powertools cannot know of:
    validation errors are 400 ``ErrorResponse`` (not 422), and every route may answer
    400/413/415 for an unreadable body and 500 with a generic message."""
    document = json.loads(
        api.app.get_openapi_json_schema(title=API_TITLE, version=API_VERSION, description=DESCRIPTION)
    )
    for operations in document.get("paths", {}).values():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            responses["400"] = {
                "description": "invalid request (the message names each bad field)",
                "content": _ERROR_REF,
            }
            if "requestBody" in operation:
                responses["413"] = {"description": "body too large", "content": _ERROR_REF}
                responses["415"] = {"description": "body is not application/json", "content": _ERROR_REF}
            responses["500"] = {"description": "internal error (logged)", "content": _ERROR_REF}
            operation["responses"] = dict(sorted(responses.items()))
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    error_schema = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(error_schema.pop("$defs", {}))
    schemas["ErrorResponse"] = error_schema
    document["components"]["schemas"] = dict(sorted(schemas.items()))
    return json.dumps(document, indent=2, sort_keys=False) + "\n"


if __name__ == "__main__":
    sys.stdout.write(openapi_json())
