"""Parses a /metrics scrape (OpenMetrics text) on stdin with the Prometheus
project's own Python parser and prints its families and samples as JSON, so the
Rust tests assert against what a real Prometheus client reads, not our own parse."""
import json
import sys

from prometheus_client.openmetrics.parser import text_string_to_metric_families

families = []
for family in text_string_to_metric_families(sys.stdin.read()):
    families.append(
        {
            "name": family.name,
            "type": family.type,
            "unit": family.unit,
            "help": family.documentation,
            "samples": [
                {"name": s.name, "labels": s.labels, "value": s.value}
                for s in family.samples
            ],
        }
    )
json.dump(families, sys.stdout)
