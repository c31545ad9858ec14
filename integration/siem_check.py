"""Checks `mayfly audit export` output (JSON lines) against the published formats.

  siem_check.py cloudevents SCHEMA FILE   each line valid under the CloudEvents 1.0 JSON schema
                                          (jsonschema, Draft 7, formats checked: date-time,
                                          uri-reference), specversion 1.0, type
                                          org.mayfly.ledger.<kind>, unique ids
  siem_check.py ocsf CLASSES FILE         each line has its OCSF class's required attributes,
                                          constraints, the objects' required attributes, a
                                          type_uid of class_uid * 100 + activity_id, ...
Both: no line carries a PEM block, a JWT or a token/secret/private-key field.
Prints how many records of each type or class; exit 1 naming the first problems.
"""
import json
import re
import sys
from collections import Counter

SECRET_NAME = re.compile(r"token|secret|passw|private|jwk", re.I)
JWT = re.compile(r"eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.")


def secrets(value, path="$"):
    if isinstance(value, dict):
        for k, v in value.items():
            if SECRET_NAME.search(k) and not k.endswith(("_id", "_jti", "_jkt")):
                yield f"{path}.{k}: a secret-named field"
            yield from secrets(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from secrets(v, f"{path}[{i}]")
    elif isinstance(value, str) and ("-----BEGIN" in value or JWT.search(value)):
        yield f"{path}: a PEM block or a JWT"


def check_cloudevents(schema_path, records):
    import jsonschema

    schema = json.load(open(schema_path))
    validator = jsonschema.Draft7Validator(schema, format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER)
    # Why list them: a format whose checker library is missing is silently not checked.
    for fmt in ("date-time", "uri-reference"):
        if fmt not in validator.format_checker.checkers:
            yield f"jsonschema cannot check format {fmt} here (install jsonschema[format-nongpl])"
            return
    ids = set()
    for n, r in records:
        for error in validator.iter_errors(r):
            yield f"line {n}: {error.json_path}: {error.message}"
        if r.get("specversion") != "1.0":
            yield f"line {n}: specversion {r.get('specversion')!r}"
        if not re.fullmatch(r"org\.mayfly\.ledger\.[a-z_]+", r.get("type", "")):
            yield f"line {n}: type {r.get('type')!r}"
        if r.get("datacontenttype") != "application/json" or not isinstance(r.get("data"), dict):
            yield f"line {n}: data is not a JSON object"
        for name in r:
            if name not in schema["properties"] and not re.fullmatch(r"[a-z0-9]{1,20}", name):
                yield f"line {n}: extension attribute {name!r} is not lowercase alphanumeric (at most 20)"
        if r.get("id") in ids:
            yield f"line {n}: id {r.get('id')} repeated"
        ids.add(r.get("id"))


def check_ocsf(classes_path, records):
    spec = json.load(open(classes_path))
    base = spec["base_event"]
    kinds = {"integer": int, "string": str}

    def has(obj, name):
        return name in obj and obj[name] not in (None, "", [], {})

    def need(obj, req, where):
        for name in req["required"]:
            if not has(obj, name):
                yield f"{where}: required `{name}` missing"
        for group in req["at_least_one"]:
            if not any(has(obj, name) for name in group):
                yield f"{where}: none of {group}"

    for n, r in records:
        where = f"line {n}"
        for name in base["required"]:
            if not has(r, name) and r.get(name) != 0:
                yield f"{where}: base attribute `{name}` missing"
        for name, t in base["types"].items():
            if name in r and (not isinstance(r[name], kinds[t]) or isinstance(r[name], bool)):
                yield f"{where}: `{name}` is not {t}"
        for name, allowed in base["enums"].items():
            if name in r and r[name] not in allowed:
                yield f"{where}: `{name}` {r[name]} not in {allowed}"
        cls = spec["classes"].get(str(r.get("class_uid")))
        if cls is None:
            yield f"{where}: class_uid {r.get('class_uid')} is not one of the mapped classes"
            continue
        where = f"line {n} ({cls['caption']})"
        if r.get("category_uid") != cls["category_uid"]:
            yield f"{where}: category_uid {r.get('category_uid')}, want {cls['category_uid']}"
        if r.get("activity_id") not in cls["activity_ids"]:
            yield f"{where}: activity_id {r.get('activity_id')} not in {cls['activity_ids']}"
        if r.get("type_uid") != r.get("class_uid", 0) * 100 + r.get("activity_id", 0):
            yield f"{where}: type_uid {r.get('type_uid')} != class_uid * 100 + activity_id"
        yield from need(r, cls, where)
        metadata = r.get("metadata", {})
        yield from need(metadata, spec["objects"]["metadata"], f"{where} metadata")
        yield from need(metadata.get("product", {}), spec["objects"]["product"], f"{where} metadata.product")
        if metadata.get("version") != spec["version"]:
            yield f"{where}: metadata.version {metadata.get('version')!r}, want {spec['version']}"
        for obj in ("user", "entity", "api", "actor", "src_endpoint", "service"):
            if obj in r:
                yield from need(r[obj], spec["objects"][obj], f"{where} {obj}")


def main():
    fmt, spec_path, path = sys.argv[1:4]
    records = []
    problems = []
    for n, line in enumerate(open(path), 1):
        if line.strip():
            try:
                records.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                problems.append(f"line {n}: not JSON: {e}")
    if not records:
        problems.append("no records")
    checker = check_cloudevents if fmt == "cloudevents" else check_ocsf
    problems += list(checker(spec_path, records))
    for n, r in records:
        problems += [f"line {n}: {p}" for p in secrets(r)]
    key = "type" if fmt == "cloudevents" else "class_name"
    counts = Counter(r.get(key) for _, r in records)
    print(f"{len(records)} records: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=str)))
    for p in problems[:20]:
        print(p)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
