"""Interop check: a Python grpcio client uploads and downloads an asset.

Usage: python assets_client.py HOST:PORT TOKEN PROJECT_NAME
Streams a 3 MiB file up in 1 MiB chunks with its sha256, downloads it whole and by
range, and fetches it through a signed URL with no token.
"""
import hashlib
import json
import os
import sys
import tempfile
import urllib.request

import grpc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from projects_client import generate  # noqa: E402


def main():
    addr, token, project = sys.argv[1], sys.argv[2], sys.argv[3]
    stubs = tempfile.TemporaryDirectory(prefix="mediaplane-py-")  # removed at exit
    generate(stubs.name)
    from mediaplane.v1 import assets_pb2, assets_pb2_grpc

    stub = assets_pb2_grpc.AssetsServiceStub(grpc.insecure_channel(addr))
    auth = [("authorization", f"Bearer {token}")]
    data = os.urandom(3 * 1024 * 1024 + 17)
    digest = hashlib.sha256(data).hexdigest()

    def requests():
        yield assets_pb2.UploadAssetContentRequest(header=assets_pb2.UploadAssetHeader(
            create=assets_pb2.CreateAssetRequest(parent=project, asset=assets_pb2.Asset(display_name="from-python.bin")),
            sha256=digest,
            size_bytes=len(data),
        ))
        for i in range(0, len(data), 1024 * 1024):
            yield assets_pb2.UploadAssetContentRequest(chunk=data[i:i + 1024 * 1024])

    asset = stub.UploadAssetContent(requests(), metadata=auth)
    assert asset.state == assets_pb2.Asset.READY, asset
    assert asset.sha256 == digest and asset.size_bytes == len(data), asset

    def download(offset=0, length=0):
        meta, body = None, bytearray()
        for msg in stub.DownloadAssetContent(
            assets_pb2.DownloadAssetContentRequest(name=asset.name, offset=offset, length=length), metadata=auth
        ):
            if msg.HasField("asset"):
                meta = msg.asset
            else:
                body.extend(msg.chunk)
        return meta, bytes(body)

    meta, body = download()
    assert meta.name == asset.name and body == data
    _, part = download(1000, 500)
    assert part == data[1000:1500]

    signed = stub.CreateSignedUrl(
        assets_pb2.CreateSignedUrlRequest(name=asset.name, method=assets_pb2.CreateSignedUrlRequest.GET), metadata=auth
    )
    with urllib.request.urlopen(signed.url) as r:
        assert r.read() == data
    print(json.dumps({"name": asset.name, "sha256": digest, "size": len(data)}))


if __name__ == "__main__":
    main()
