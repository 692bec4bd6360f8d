"""Write twin's OpenAPI document (what ``/api`` serves) to a file, without a database.

``python -m twin.api.openapi_dump web/src/generated/openapi.json`` is how the web build gets the
document its TypeScript types are generated from (see the Makefile's ``web`` target). The app is
built but never started: its lifespan, the only part that opens connections, does not run.
The file is rewritten only when the document changed, so make and tsc see a stable mtime.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from twin.api.app import create_app
from twin.core.settings import Settings


def openapi_document(settings: Settings | None = None) -> dict:
    return create_app(settings or Settings()).openapi()


def write_if_changed(path: Path, text: str) -> bool:
    """True when the file was (re)written."""
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return True


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m twin.api.openapi_dump OUT.json", file=sys.stderr)
        return 2
    # Sorted keys: the same API gives the same bytes whatever the routers' order of dicts.
    text = json.dumps(openapi_document(), indent=1, sort_keys=True, ensure_ascii=False) + "\n"
    out = Path(argv[0])
    print(f"{out}: {'written' if write_if_changed(out, text) else 'unchanged'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
