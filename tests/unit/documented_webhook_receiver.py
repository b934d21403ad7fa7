"""The webhook receiver as printed in docs/operations.md ("Verifying a webhook"), run as code:
the unit and fuzz tests check that the documented copy agrees with ``spotguard_core.webhooks``."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

OPERATIONS_MD = Path(__file__).resolve().parents[2] / "docs" / "operations.md"


@functools.cache
def documented_receiver() -> dict[str, Any]:
    """The namespace of the section's first ``python`` block (``verify``, ``is_authentic``,
    ``SignatureError`` …)."""
    text = OPERATIONS_MD.read_text()
    section = text[text.index("### Verifying a webhook") :]
    start = section.index("```python") + len("```python")
    namespace: dict[str, Any] = {}
    exec(compile(section[start : section.index("```", start)], "operations.md", "exec"), namespace)
    return namespace
