"""Validates the Prometheus Operator documents (apiVersion monitoring.coreos.com/*) among rendered
manifests, strictly: run by `cargo xtask manifests` with the pinned cloudcoil models, whose
pydantic classes are generated from the operator's CRD schemas. The models ignore unknown
fields, as the API server prunes them; here every model forbids them, so a misspelt field is an
error, as with `kubernetes-validate --strict`.

Usage: python validate_monitoring.py FILE...   Prints `validated N`; exit 1 on any error.
"""

import sys

import pydantic
import yaml
from cloudcoil.models.prometheus_operator import v1
from cloudcoil.pydantic import BaseModel

GROUP = "monitoring.coreos.com/"
KINDS = {"monitoring.coreos.com/v1": v1}


def forbid_unknown_fields():
    models = []
    pending = [BaseModel]
    while pending:
        for sub in pending.pop().__subclasses__():
            models.append(sub)
            pending.append(sub)
    for model in models:
        model.model_config["extra"] = "forbid"
    # Twice: a model's schema embeds those of the models it holds, rebuilt in the first round.
    for _ in range(2):
        for model in models:
            model.model_rebuild(force=True)


def main(paths):
    forbid_unknown_fields()
    errors, validated = [], 0
    for path in paths:
        with open(path, encoding="utf-8") as file:
            documents = [d for d in yaml.safe_load_all(file) if d]
        for document in documents:
            api_version = document.get("apiVersion", "")
            if not api_version.startswith(GROUP):
                continue
            kind = document.get("kind", "")
            name = f"{path}: {kind} {document.get('metadata', {}).get('name')}"
            module = KINDS.get(api_version)
            model = getattr(module, kind, None) if module else None
            if model is None:
                errors.append(f"{name}: no schema for {api_version} {kind}")
                continue
            try:
                model.model_validate(document)
                validated += 1
            except pydantic.ValidationError as err:
                errors.append(f"{name}: {err}")
    for error in errors:
        print(error)
    print(f"validated {validated}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
