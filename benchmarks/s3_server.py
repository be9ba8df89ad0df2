"""A throw-away S3-compatible store on 127.0.0.1 for the tests and the scale-out benchmark: moto in server mode (a
dev dependency), holding objects in memory, with one bucket created. Real HTTP, real S3 protocol: boto3 talks to it
as to any store named by AWS_ENDPOINT_URL."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from service.run_local import free_port, http_status, stop, wait_until

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


class S3Server:
    def __init__(self, logs: Path, bucket: str):
        self.logs, self.bucket, self.port, self.process = Path(logs), bucket, free_port(), None
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.env = CREDENTIALS | {"AWS_ENDPOINT_URL": self.endpoint}  # what gateway and workers need to reach it

    def start(self) -> "S3Server":
        log = open(self.logs / "s3.log", "ab")
        self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(lambda: http_status(f"{self.endpoint}/moto-api/") == 200, 30, "the S3 server", {"s3": self.process})
        self.client().create_bucket(Bucket=self.bucket)
        return self

    def client(self):
        import boto3

        return boto3.session.Session(aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                                     aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                                     region_name=CREDENTIALS["AWS_DEFAULT_REGION"]).client(
            "s3", endpoint_url=self.endpoint)

    def keys(self, prefix: str = "") -> list[str]:
        paginator = self.client().get_paginator("list_objects_v2")
        return [item["Key"] for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix)
                for item in page.get("Contents", [])]

    def stop(self) -> None:
        stop([self.process])
