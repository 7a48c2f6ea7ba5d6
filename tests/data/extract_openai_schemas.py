"""Regenerate openai_schemas.json from the official OpenAI OpenAPI spec (shared/reference/openai-openapi.yaml).

    python tests/data/extract_openai_schemas.py ../shared/reference/openai-openapi.yaml
"""

import json
import re
import sys
from pathlib import Path

import yaml

ROOTS = ["CreateChatCompletionResponse", "CreateChatCompletionStreamResponse", "CreateCompletionResponse",
         "ListModelsResponse", "Model", "ErrorResponse"]


def main(path: str) -> None:
    with open(path) as f:
        spec = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    comps = spec["components"]["schemas"]
    need: set[str] = set()
    stack = list(ROOTS)
    while stack:
        name = stack.pop()
        if name not in need:
            need.add(name)
            stack += re.findall(r"#/components/schemas/([A-Za-z0-9_.-]+)", json.dumps(comps[name]))
    out = {"$comment": "Subset of components.schemas from openai/openai-openapi openapi.yaml @ f85dbe2 (2026-08-21), "
                       "extracted by tests/data/extract_openai_schemas.py",
           "components": {"schemas": {n: comps[n] for n in sorted(need)}}}
    Path(__file__).with_name("openai_schemas.json").write_text(json.dumps(out, indent=0, sort_keys=True))


if __name__ == "__main__":
    main(sys.argv[1])
