"""Extract the google provider's resource schema for the resource types infra/ uses.

    python infra/provider_schema.py WHEEL   # or: make provider-schema (downloads the wheel from PyPI)

The source is cdktf-cdktf-provider-google, the provider's bindings generated from its
published schema: its jsii assembly documents every argument and nested block of every
resource with a link to the registry page (``.../docs/resources/storage_bucket#versioning``),
which names the Terraform argument exactly. Only the resource and data-source types used in
infra/*.tf and infra/bootstrap/*.tf (both roots) are written, to infra/google-provider-schema.json, so the tests check every
argument there against the provider without a provider download.
"""

from __future__ import annotations

import io
import json
import re
import sys
import tarfile
import zipfile
from pathlib import Path
from typing import Any

INFRA = Path(__file__).resolve().parent
ROOTS = (INFRA, INFRA / "bootstrap")  # the system, and the bootstrap root applied before it
SCHEMA_FILE = INFRA / "google-provider-schema.json"
_ARGUMENT_LINK = re.compile(
    r"/hashicorp/google/(?P<version>[\d.]+)/docs/(?P<kind>resources|data-sources)/(?P<slug>\w+)#(?P<arg>\w+)"
)
_CAMEL = re.compile(r"(?<!^)([A-Z])")
_USED = re.compile(r'^(resource|data)\s+"(google_\w+)"', re.MULTILINE)


def _assembly(wheel: Path) -> dict[str, Any]:
    with zipfile.ZipFile(wheel) as package:
        [tgz] = [n for n in package.namelist() if n.endswith(".jsii.tgz")]
        with tarfile.open(fileobj=io.BytesIO(package.read(tgz))) as tar:
            return json.loads(tar.extractfile("package/.jsii").read())


def _link(prop: dict[str, Any]) -> re.Match | None:
    """The registry link of a property: in its remarks, or in its summary when the text is short."""
    docs = prop.get("docs", {})
    return _ARGUMENT_LINK.search(docs.get("remarks", "")) or _ARGUMENT_LINK.search(docs.get("summary", ""))


def _block_types(type_ref: Any) -> list[str]:
    """The fqn of the nested block a property holds (a block, or a list of blocks), if any."""
    if isinstance(type_ref, dict):
        if "fqn" in type_ref:
            return [type_ref["fqn"]] if type_ref["fqn"].startswith("@cdktf/provider-google.") else []
        return [fqn for value in type_ref.values() for fqn in _block_types(value)]
    if isinstance(type_ref, list):
        return [fqn for value in type_ref for fqn in _block_types(value)]
    return []


def _arguments(types: dict[str, Any], fqn: str, seen: frozenset[str] = frozenset()) -> dict[str, Any]:
    """{argument: {}} for plain arguments, {block: {...its arguments}} for nested blocks."""
    arguments: dict[str, Any] = {}
    for prop in types.get(fqn, {}).get("properties", []):
        link = _link(prop)
        # A few arguments' docs carry no registry link (google_compute_global_forwarding_rule's port_range, whose
        # summary is a long list): their name is the binding's, in snake case, as every other argument's is.
        # These are config structs: arguments and blocks only, never computed attributes.
        name = link["arg"] if link else _CAMEL.sub(r"_\1", prop["name"]).lower()
        nested = [t for t in _block_types(prop["type"]) if t not in seen]
        arguments[name] = _arguments(types, nested[0], seen | {fqn}) if nested else {}
    return arguments


def extract(wheel: Path, used: set[str]) -> dict[str, Any]:
    types = _assembly(wheel)["types"]
    schema: dict[str, Any] = {"resource": {}, "data": {}}
    version = ""
    for fqn, spec in types.items():
        # A resource's (or data source's) own arguments, not a nested block that happens to end in "Config".
        if "cdktf.TerraformMetaArguments" not in spec.get("interfaces", []):
            continue
        for prop in spec.get("properties", []):
            link = _link(prop)
            if link:
                break
        else:
            continue
        kind = "resource" if link["kind"] == "resources" else "data"
        name = f"google_{link['slug']}"
        if (kind, name) in used:
            schema[kind][name] = _arguments(types, fqn)
            version = link["version"]
    missing = sorted(f"{k} {n}" for k, n in used if n not in schema[k])
    if missing:
        raise SystemExit(f"not in the provider's schema: {', '.join(missing)}")
    return {"provider": f"hashicorp/google {version}", "source": wheel.name, **schema}


def used_types() -> set[tuple[str, str]]:
    return {(kind, name) for root in ROOTS for path in root.glob("*.tf") for kind, name in _USED.findall(path.read_text())}


def main() -> None:
    wheel = Path(sys.argv[1])
    SCHEMA_FILE.write_text(json.dumps(extract(wheel, used_types()), indent=1, sort_keys=True) + "\n")
    print(f"wrote {SCHEMA_FILE} from {wheel.name}")


if __name__ == "__main__":
    main()
