"""A mediaplane worker in Python (grpcio), with stubs generated from proto/ alone.

    python examples/python_worker.py HOST:PORT WORKER_TOKEN --kinds render [--max-jobs N] [--batch N] [--session]

The protocol, in full:
  1. AcquireJobs(worker_id, kinds, max_jobs, lease_duration, wait_timeout) long-polls and
     returns leased jobs, each with a lease_id and lease_expire_time.
  2. While working, ReportProgress(name, lease_id, progress_percent, current_step, message)
     at least once per lease period: it extends the lease and says whether to stop
     (cancel_requested). ABORTED means the lease is gone: stop, someone else has the job.
  3. CompleteJob(name, lease_id, result, output_assets), or
     FailJob(name, lease_id, error, retryable, retry_after).
     This worker completes with BatchCompleteJobs instead, whose results[i] is either
     the stored job or the google.rpc.Status that CompleteJob would have answered, and
     whose `acquire` leases its next jobs in the same call (AcquireJobs again only when
     none came). With --batch N it leases up to N jobs at a time and completes the
     finished ones together.
  With --session every one of these calls goes over one WorkerSession stream instead:
  each request carries an id, its answer carries it back with what the call would have
  answered (its error in `error`, the stream staying open). Losing the stream gives
  nothing back: the leases lapse as a stopped worker's would.
"""
import argparse
import importlib.resources
import itertools
import os
import queue
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


class Refused(Exception):
    """A call's error, whichever way it came: its gRPC code name and message."""

    def __init__(self, code, message):
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message


class Unary:
    """The worker methods as one call each."""

    def __init__(self, stub, auth):
        self.stub, self.auth = stub, auth

    def _call(self, method, request):
        try:
            return method(request, metadata=self.auth)
        except grpc.RpcError as e:
            raise Refused(e.code().name, e.details()) from e

    def acquire_jobs(self, request):
        return self._call(self.stub.AcquireJobs, request)

    def report_progress(self, request):
        return self._call(self.stub.ReportProgress, request)

    def batch_complete_jobs(self, request):
        return self._call(self.stub.BatchCompleteJobs, request)

    def fail_job(self, request):
        return self._call(self.stub.FailJob, request)

    def close(self):
        pass


class Session:
    """The worker methods over one WorkerSession stream. This worker waits for each
    answer before its next request; a worker may instead keep many in flight and match
    answers to requests by id."""

    def __init__(self, stub, auth, jobs_pb2):
        self.jobs_pb2 = jobs_pb2
        self.outbox = queue.Queue()
        self.ids = itertools.count(1)

        def requests():
            while (request := self.outbox.get()) is not None:
                yield request

        self.answers = stub.WorkerSession(requests(), metadata=auth)

    def _ask(self, field, request, answer_field):
        request_id = next(self.ids)
        self.outbox.put(self.jobs_pb2.WorkerSessionRequest(id=request_id, **{field: request}))
        answer = next(self.answers)
        assert answer.id == request_id, (answer.id, request_id)
        if answer.WhichOneof("response") == "error":
            raise Refused(CODE_NAMES.get(answer.error.code, answer.error.code), answer.error.message)
        return getattr(answer, answer_field)

    def acquire_jobs(self, request):
        return self._ask("acquire_jobs", request, "acquire_jobs")

    def report_progress(self, request):
        return self._ask("report_progress", request, "report_progress")

    def batch_complete_jobs(self, request):
        return self._ask("batch_complete_jobs", request, "batch_complete_jobs")

    def fail_job(self, request):
        return self._ask("fail_job", request, "fail_job")

    def close(self):
        self.outbox.put(None)  # half-close: the server ends the stream after its answers
        for _ in self.answers:
            pass


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("addr")
    parser.add_argument("token")
    parser.add_argument("--kinds", required=True)
    parser.add_argument("--max-jobs", type=int, default=0, help="exit after this many jobs (0: forever)")
    parser.add_argument("--batch", type=int, default=0,
                        help="lease up to N jobs at once and complete them in one BatchCompleteJobs")
    parser.add_argument("--session", action="store_true",
                        help="make every call on one WorkerSession stream")
    args = parser.parse_args()

    jobs_pb2, jobs_pb2_grpc = load_stubs()
    from google.protobuf import duration_pb2, struct_pb2
    from google.rpc import status_pb2

    stub = jobs_pb2_grpc.JobsServiceStub(grpc.insecure_channel(args.addr))
    auth = [("authorization", f"Bearer {args.token}")]
    worker_id = f"py-{socket.gethostname()}-{os.getpid()}"
    calls = Session(stub, auth, jobs_pb2) if args.session else Unary(stub, auth)

    def run(leased):
        """Works on one leased job; its result, or None when it must not be completed."""
        job = leased.job
        try:
            for pct in (25, 50, 75, 100):
                beat = calls.report_progress(jobs_pb2.ReportProgressRequest(
                    name=job.name, lease_id=leased.lease_id, progress_percent=pct,
                    current_step=f"python step {pct}",
                ))
                if beat.cancel_requested:
                    calls.fail_job(jobs_pb2.FailJobRequest(
                        name=job.name, lease_id=leased.lease_id,
                        error=status_pb2.Status(code=1, message="cancelled"), retryable=False,
                    ))
                    print(f"cancelled {job.name}", flush=True)
                    return None
                time.sleep(0.05)
        except Refused as e:
            if e.code == "ABORTED":
                print(f"lease lost on {job.name}: {e.message}", flush=True)
                return None
            raise
        result = struct_pb2.Struct()
        result.update({"worker": "python", "prompt": dict(job.input).get("prompt", "")})
        return result

    def next_jobs(done):
        """What to lease next (up to --batch jobs, within --max-jobs), or None."""
        want = max(1, args.batch)
        if args.max_jobs:
            want = min(want, args.max_jobs - done)
        if want <= 0:
            return None
        return jobs_pb2.AcquireJobsRequest(
            worker_id=worker_id,
            kinds=args.kinds.split(","),
            max_jobs=want,
            lease_duration=duration_pb2.Duration(seconds=30),
        )

    done = 0
    pending = []  # jobs leased along with the last completions
    while args.max_jobs == 0 or done < args.max_jobs:
        if not pending:
            request = next_jobs(done)
            request.wait_timeout.CopyFrom(duration_pb2.Duration(seconds=10))
            pending = list(calls.acquire_jobs(request).jobs)
            for leased in pending:
                print(f"leased {leased.job.name}", flush=True)
            continue
        finished = []
        for leased in pending:
            done += 1
            result = run(leased)
            if result is not None:
                finished.append(jobs_pb2.CompleteJobRequest(
                    name=leased.job.name, lease_id=leased.lease_id, result=result))
        pending = []
        if not finished:
            continue
        # The completions and the lease of the next jobs in one call: two calls per
        # job instead of three (AcquireJobs only when nothing came with them).
        answer = calls.batch_complete_jobs(
            jobs_pb2.BatchCompleteJobsRequest(requests=finished, acquire=next_jobs(done)))
        # Each completion stands alone: a refused one (say, a lease that expired while
        # the others ran) is reported, and the rest are done.
        how = (" (batch)" if args.batch else "") + (" (session)" if args.session else "")
        for request, outcome in zip(finished, answer.results):
            if outcome.HasField("job"):
                print(f"completed {outcome.job.name}{how}", flush=True)
            else:
                code = CODE_NAMES.get(outcome.error.code, outcome.error.code)
                print(f"refused {request.name}: {code} {outcome.error.message}", flush=True)
        if answer.HasField("acquire_error"):
            print(f"leasing with the completions failed: {answer.acquire_error.message}", flush=True)
        pending = list(answer.acquired)
        for leased in pending:
            print(f"leased {leased.job.name} (with a completion)", flush=True)
    calls.close()

if __name__ == "__main__":
    main()
