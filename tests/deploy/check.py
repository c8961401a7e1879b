"""Offline checks of the Kubernetes manifests: renders the example overlay with
`kubectl kustomize`, validates every built-in object strictly against the Kubernetes
API schema of one version (kubernetes-validate bundles the schemas), and prints as
JSON what the Rust test checks against a real server: the health service names the
probes use, and the metric names the alerts and the metrics table of docs/operations.md use."""
import json
import re
import subprocess
import sys

import kubernetes_validate
import yaml

KUBERNETES = "1.33.0"
ROOT = sys.argv[1]

rendered = subprocess.run(
    ["kubectl", "kustomize", f"{ROOT}/deploy/kubernetes/overlays/example"],
    check=True,
    capture_output=True,
    text=True,
).stdout
objects = [o for o in yaml.safe_load_all(rendered) if o]

kinds = sorted({o["kind"] for o in objects})
validated = []
for o in objects:
    if o["apiVersion"].startswith("monitoring.coreos.com/"):
        continue  # CRDs: no schema in the bundle; their content is checked below.
    kubernetes_validate.validate(o, KUBERNETES, strict=True)
    validated.append(f'{o["kind"]}/{o["metadata"]["name"]}')

probes = []
for o in objects:
    if o["kind"] != "Deployment":
        continue
    for c in o["spec"]["template"]["spec"]["containers"]:
        for p in ("startupProbe", "livenessProbe", "readinessProbe"):
            grpc = c.get(p, {}).get("grpc")
            if grpc:
                probes.append({"probe": p, "port": grpc["port"], "service": grpc.get("service", "")})

METRIC = re.compile(r"\b((?:mediaplane|grpc_server|process)_[a-z0-9_]+)")
alerts = []
for o in objects:
    if o["kind"] == "PrometheusRule":
        for group in o["spec"]["groups"]:
            for rule in group["rules"]:
                alerts.append({"alert": rule["alert"], "metrics": sorted(set(METRIC.findall(rule["expr"])))})

operations = open(f"{ROOT}/docs/operations.md").read()
section = operations.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
documented = sorted(set(METRIC.findall(section)))

json.dump(
    {"kinds": kinds, "validated": validated, "probes": probes, "alerts": alerts, "documented": documented},
    sys.stdout,
)
