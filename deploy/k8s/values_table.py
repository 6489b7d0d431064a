#!/usr/bin/env python3
"""Generates the "Parameters" table of helm/tollguard/README.md from the
`# --` comments of helm/tollguard/values.yaml (standard library only).

    python3 deploy/k8s/values_table.py            # rewrite the table in README.md
    python3 deploy/k8s/values_table.py --check    # exit 1 if README.md is stale

Every leaf of values.yaml gets a row (tests/helm_chart.rs checks that); a
value without its own `# --` comment gets a generic text or its parent's.
"""
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
VALUES = ROOT / "helm/tollguard/values.yaml"
README = ROOT / "helm/tollguard/README.md"
START, END = "<!-- values-table:start -->", "<!-- values-table:end -->"

GENERIC = {
    "initialDelaySeconds": "Seconds before the first probe.",
    "periodSeconds": "Seconds between probes.",
    "timeoutSeconds": "Probe timeout in seconds.",
    "failureThreshold": "Failures in a row before the probe fails (startup/liveness: restart; readiness: out of the Service).",
}
TOPIC = {
    "name": "Topic name.",
    "partitions": "Partitions (raised on upgrade, never lowered: Kafka cannot shrink a topic; raising them remaps keys to partitions).",
    "replicationFactor": "Replication factor at creation.",
}
KEY = re.compile(r'^(\s*)([A-Za-z0-9_.\-"]+):(.*)$')
DOC = re.compile(r"^\s*# -- (.*)$")


def entries():
    """(path, value text, own description) for every key, in file order."""
    out, stack, pending = [], [], []
    for line in VALUES.read_text().splitlines():
        if not line.strip():
            continue
        m = DOC.match(line)
        if m:
            pending.append(m.group(1))
            continue
        if line.lstrip().startswith("#"):
            continue
        m = KEY.match(line)
        if not m:  # a list item of a block value
            pending = []
            continue
        indent, key = len(m.group(1)), m.group(2).strip('"')
        value = re.sub(r"\s+#.*$", "", m.group(3)).strip()
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = ".".join([k for _, k in stack] + [key])
        out.append((path, value, " ".join(pending)))
        stack.append((indent, key))
        pending = []
    return out


def code(v):
    return f"`{v}`".replace("|", "\\|") if v else ""


def table():
    es = entries()
    paths = [p for p, _, _ in es]
    desc = {p: d for p, _, d in es}

    def inherited(path):
        parent = path.rsplit(".", 1)[0] if "." in path else ""
        while parent and not desc.get(parent):
            parent = parent.rsplit(".", 1)[0] if "." in parent else ""
        return f"{desc[parent].rstrip('.')}: `{path.rsplit('.', 1)[-1]}`." if parent else ""

    rows, topic_done = [], set()
    for path, value, own in es:
        if value == "" and any(p.startswith(path + ".") for p in paths):
            continue  # a section, not a leaf
        m = re.match(r"^(topics\.[a-z]+)\.(name|partitions|replicationFactor|config)(\..*)?$", path)
        if m:
            topic, field = m.group(1), m.group(2)
            if field == "config":
                if topic in topic_done:
                    continue
                topic_done.add(topic)
                cfg = ", ".join(
                    f"{p[len(topic) + 8:]}={v.strip(chr(34))}"
                    for p, v, _ in es
                    if p.startswith(topic + ".config.")
                )
                rows.append((f"{topic}.config", f"{desc[topic]} Topic configs (kafka-configs names), set at creation and on every upgrade.", code(cfg)))
            else:
                rows.append((path, f"{desc[topic]} {TOPIC[field]}", code(value)))
            continue
        leaf = path.rsplit(".", 1)[-1]
        text = own or GENERIC.get(leaf) or inherited(path)
        rows.append((path, text, code(value)))
    lines = ["| Value | Description | Default |", "|---|---|---|"]
    lines += [f"| `{p}` | {d.replace('|', chr(92) + '|')} | {v} |" for p, d, v in rows]
    return "\n".join(lines)


def main():
    text = README.read_text()
    if START not in text or END not in text:
        sys.exit(f"{README}: markers {START} / {END} missing")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{START}\n{table()}\n{END}{tail}"
    if "--check" in sys.argv[1:]:
        if new != text:
            sys.exit(f"{README} is stale: run python3 deploy/k8s/values_table.py")
        return
    README.write_text(new)


if __name__ == "__main__":
    main()
