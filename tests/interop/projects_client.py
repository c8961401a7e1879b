"""Interop check: a Python grpcio client, with stubs generated from proto/ alone.

Usage: python projects_client.py HOST:PORT TOKEN
Creates and reads a project with a bearer token, checks that a call without one is
UNAUTHENTICATED, and asks grpc.health.v1 for `readiness` as a kubelet would.
"""
import importlib.resources
import json
import os
import sys
import tempfile

import grpc
from grpc_tools import protoc

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROTO = os.path.join(ROOT, "proto")


def generate(out):
    well_known = str(importlib.resources.files("grpc_tools") / "_proto")
    files = [
        "mediaplane/v1/projects.proto",
        "mediaplane/v1/jobs.proto",
        "mediaplane/v1/assets.proto",
        "google/api/annotations.proto",
        "google/api/http.proto",
        "google/api/field_behavior.proto",
        "google/rpc/status.proto",
    ]
    args = ["protoc", f"-I{PROTO}", f"-I{well_known}", f"--python_out={out}", f"--grpc_python_out={out}", *files]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed on proto/")
    sys.path.insert(0, out)


def main():
    addr, token = sys.argv[1], sys.argv[2]
    stubs = tempfile.TemporaryDirectory(prefix="mediaplane-py-")  # removed at exit
    generate(stubs.name)
    from mediaplane.v1 import projects_pb2, projects_pb2_grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    channel = grpc.insecure_channel(addr)
    stub = projects_pb2_grpc.ProjectsServiceStub(channel)
    auth = [("authorization", f"Bearer {token}")]

    created = stub.CreateProject(
        projects_pb2.CreateProjectRequest(
            project=projects_pb2.Project(display_name="from python", labels={"lang": "python"}),
            request_id="py-1",
        ),
        metadata=auth,
    )
    got = stub.GetProject(projects_pb2.GetProjectRequest(name=created.name), metadata=auth)
    assert got.display_name == "from python", got
    assert got.labels["lang"] == "python", got
    again = stub.CreateProject(
        projects_pb2.CreateProjectRequest(
            project=projects_pb2.Project(display_name="from python", labels={"lang": "python"}),
            request_id="py-1",
        ),
        metadata=auth,
    )
    assert again.name == created.name, (again.name, created.name)

    try:
        stub.GetProject(projects_pb2.GetProjectRequest(name=created.name))
        raise SystemExit("a call without a token succeeded")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.UNAUTHENTICATED, e

    try:
        stub.CreateProject(projects_pb2.CreateProjectRequest(project=projects_pb2.Project()), metadata=auth)
        raise SystemExit("an invalid project was accepted")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e
        details = dict(e.trailing_metadata()).get("grpc-status-details-bin")
        assert details, "google.rpc.Status details are sent"

    health = health_pb2_grpc.HealthStub(channel)
    ready = health.Check(health_pb2.HealthCheckRequest(service="readiness"), timeout=5)
    assert ready.status == health_pb2.HealthCheckResponse.SERVING, ready

    print(json.dumps({"name": created.name, "owner": got.owner, "readiness": "SERVING"}))


if __name__ == "__main__":
    main()
