"""A mediaplane worker in Python (grpcio), with stubs generated from proto/ alone.

    python examples/python_worker.py HOST:PORT WORKER_TOKEN --kinds render [--max-jobs N] [--batch N]

The protocol, in full:
  1. AcquireJobs(worker_id, kinds, max_jobs, lease_duration, wait_timeout) long-polls and
     returns leased jobs, each with a lease_id and lease_expire_time.
  2. While working, ReportProgress(name, lease_id, progress_percent, current_step, message)
     at least once per lease period: it extends the lease and says whether to stop
     (cancel_requested). ABORTED means the lease is gone: stop, someone else has the job.
  3. CompleteJob(name, lease_id, result, output_assets), or
     FailJob(name, lease_id, error, retryable, retry_after).
     With --batch N the worker leases up to N jobs at a time and completes the finished
     ones in one BatchCompleteJobs call, whose results[i] is either the stored job or
     the google.rpc.Status that CompleteJob would have answered for that job.
"""
import argparse
import importlib.resources
import os
import socket
import sys
import tempfile
import time

import grpc
from grpc_tools import protoc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


CODE_NAMES = {c.value[0]: c.name for c in grpc.StatusCode}

_STUBS = tempfile.TemporaryDirectory(prefix="mediaplane-worker-")  # removed at exit


def load_stubs():
    out = _STUBS.name
    well_known = str(importlib.resources.files("grpc_tools") / "_proto")
    files = ["mediaplane/v1/jobs.proto", "google/api/annotations.proto", "google/api/http.proto",
             "google/api/field_behavior.proto", "google/rpc/status.proto"]
    if protoc.main(["protoc", f"-I{ROOT}/proto", f"-I{well_known}", f"--python_out={out}",
                    f"--grpc_python_out={out}", *files]) != 0:
        raise SystemExit("protoc failed")
    sys.path.insert(0, out)
    from mediaplane.v1 import jobs_pb2, jobs_pb2_grpc
    return jobs_pb2, jobs_pb2_grpc


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("addr")
    parser.add_argument("token")
    parser.add_argument("--kinds", required=True)
    parser.add_argument("--max-jobs", type=int, default=0, help="exit after this many jobs (0: forever)")
    parser.add_argument("--batch", type=int, default=0,
                        help="lease up to N jobs at once and complete them in one BatchCompleteJobs")
    args = parser.parse_args()

    jobs_pb2, jobs_pb2_grpc = load_stubs()
    from google.protobuf import duration_pb2, struct_pb2
    from google.rpc import status_pb2

    stub = jobs_pb2_grpc.JobsServiceStub(grpc.insecure_channel(args.addr))
    auth = [("authorization", f"Bearer {args.token}")]
    worker_id = f"py-{socket.gethostname()}-{os.getpid()}"

    def run(leased):
        """Works on one leased job; its result, or None when it must not be completed."""
        job = leased.job
        try:
            for pct in (25, 50, 75, 100):
                beat = stub.ReportProgress(
                    jobs_pb2.ReportProgressRequest(
                        name=job.name, lease_id=leased.lease_id, progress_percent=pct,
                        current_step=f"python step {pct}",
                    ),
                    metadata=auth,
                )
                if beat.cancel_requested:
                    stub.FailJob(jobs_pb2.FailJobRequest(
                        name=job.name, lease_id=leased.lease_id,
                        error=status_pb2.Status(code=1, message="cancelled"), retryable=False,
                    ), metadata=auth)
                    return None
                time.sleep(0.05)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.ABORTED:
                print(f"lease lost on {job.name}: {e.details()}", flush=True)
                return None
            raise
        result = struct_pb2.Struct()
        result.update({"worker": "python", "prompt": dict(job.input).get("prompt", "")})
        return result

    done = 0
    while args.max_jobs == 0 or done < args.max_jobs:
        response = stub.AcquireJobs(
            jobs_pb2.AcquireJobsRequest(
                worker_id=worker_id,
                kinds=args.kinds.split(","),
                max_jobs=max(1, args.batch),
                lease_duration=duration_pb2.Duration(seconds=30),
                wait_timeout=duration_pb2.Duration(seconds=10),
            ),
            metadata=auth,
        )
        finished = []
        for leased in response.jobs:
            done += 1
            result = run(leased)
            if result is None:
                continue
            request = jobs_pb2.CompleteJobRequest(
                name=leased.job.name, lease_id=leased.lease_id, result=result)
            if args.batch:
                finished.append(request)
                continue
            try:
                stub.CompleteJob(request, metadata=auth)
                print(f"completed {request.name}", flush=True)
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.ABORTED:
                    raise
                print(f"lease lost on {request.name}: {e.details()}", flush=True)
        if finished:
            answer = stub.BatchCompleteJobs(
                jobs_pb2.BatchCompleteJobsRequest(requests=finished), metadata=auth)
            # Each completion stands alone: a refused one (say, a lease that expired
            # while the others ran) is reported, and the rest are done.
            for request, outcome in zip(finished, answer.results):
                if outcome.HasField("job"):
                    print(f"completed {outcome.job.name} (batch)", flush=True)
                else:
                    code = CODE_NAMES.get(outcome.error.code, outcome.error.code)
                    print(f"refused {request.name}: {code} {outcome.error.message}", flush=True)


if __name__ == "__main__":
    main()
