"""A real S3 endpoint for tests: moto's server over HTTP on 127.0.0.1, one per session."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pytest

from _fault_proxy import FaultProxy

AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class MotoServer:
    endpoint_url: str
    host: str
    port: int

    def client(self):  # type: ignore[no-untyped-def]
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name="us-east-1")


@pytest.fixture(scope="session")
def aws_env() -> Iterator[None]:
    """Fake credentials for the whole session; real ones never reach the fake server."""
    saved = {k: os.environ.get(k) for k in [*AWS_ENV, "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"]}
    os.environ.update(AWS_ENV)
    for key in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        os.environ.pop(key, None)
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def moto_server(aws_env: None) -> Iterator[MotoServer]:
    """moto's S3 server on a free loopback port, started once per session."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield MotoServer(f"http://127.0.0.1:{port}", "127.0.0.1", port)
    finally:
        server.stop()


# -- added for the S3 source tests ---------------------------------------------------------


def make_bucket(client: Any, prefix: str = "bkt", *, versioned: bool = False) -> str:
    """Create a bucket with a unique name (optionally versioned) and return its name."""
    name = f"{prefix}-{uuid.uuid4().hex[:10]}"
    client.create_bucket(Bucket=name)
    if versioned:
        client.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
    return name


def put_files(client: Any, bucket: str, prefix: str, files: Mapping[str, bytes], *, replace: bool = True) -> None:
    """Upload ``files`` under ``prefix``; with ``replace`` delete what was there first."""
    if replace:
        listed = client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
        if listed:
            client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": o["Key"]} for o in listed]})
    for rel, data in files.items():
        client.put_object(Bucket=bucket, Key=prefix + rel, Body=data)


@pytest.fixture(scope="session")
def s3_client(moto_server: MotoServer) -> Any:
    """A boto3 client talking to the session's moto server directly (no proxy)."""
    return moto_server.client()


@pytest.fixture
def fault_proxy(moto_server: MotoServer) -> Iterator[FaultProxy]:
    """A fault-injecting proxy in front of the session's moto server (no faults until asked)."""
    with FaultProxy(moto_server.endpoint_url) as proxy:
        yield proxy


@dataclass(frozen=True)
class AuthMotoServer:
    """A moto server that checks credentials (IAM), with one user allowed ``s3:*``."""

    endpoint_url: str
    access_key: str
    secret_key: str

    def client(self, access_key: str | None = None, secret_key: str | None = None) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name="us-east-1",
            aws_access_key_id=access_key or self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
        )


@pytest.fixture(scope="session")
def moto_auth_server(aws_env: None) -> Iterator[AuthMotoServer]:
    """A second moto server, in its own process, that enforces authentication.

    moto checks credentials once ``INITIAL_NO_AUTH_ACTION_COUNT`` actions have run; the
    setting is process-wide, so it gets a process of its own. The first three actions
    create a user, its key and an ``s3:*`` policy; every later request must be signed by
    that key.
    """
    import boto3

    port = free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the authenticating moto server did not start") from None
                time.sleep(0.05)
        iam = boto3.client("iam", endpoint_url=url, region_name="us-east-1")
        iam.create_user(UserName="loader")
        key = iam.create_access_key(UserName="loader")["AccessKey"]
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
        iam.put_user_policy(UserName="loader", PolicyName="s3", PolicyDocument=json.dumps(policy))
        yield AuthMotoServer(url, key["AccessKeyId"], key["SecretAccessKey"])
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
