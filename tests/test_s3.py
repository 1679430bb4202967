"""s3:// for real: data read from and results written to buckets of an S3-compatible server on 127.0.0.1.

The server is moto's (``moto[server]``). A sweep reads its shards from one bucket and writes its
unit files and tables to another; its driver is killed mid-run and rerun; a reader that keeps
reading every object under the output prefix never sees a half-written one; and the tables
equal those of the same sweep on a local disk (``attack_run``, conftest.py).
"""

from __future__ import annotations

import fnmatch
import json
import os
import posixpath
import signal
import subprocess
import threading
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import tomli_w
from helpers import ATTACK, attack_config, sweep_command, wait_for

from pixelray.engine.units import model_slug
from pixelray.shards import check_dataset, load_manifest
from pixelray.store.atomic import TMP_GLOB

ENV = {"AWS_ACCESS_KEY_ID": "pixelray-test", "AWS_SECRET_ACCESS_KEY": "pixelray-test",
       "AWS_EC2_METADATA_DISABLED": "true", "RAY_USAGE_STATS_ENABLED": "0"}
PHASES = ("clean", "cells", "attack")


@pytest.fixture(scope="module")
def s3_server():
    """moto's S3 server on 127.0.0.1 (a free port); yields the endpoint ``127.0.0.1:PORT``."""
    from moto.server import ThreadedMotoServer

    for key, value in ENV.items():
        os.environ.setdefault(key, value)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"{host}:{port}"
    server.stop()


def uri(endpoint: str, path: str) -> str:
    return f"s3://{path}?endpoint_override={endpoint}&scheme=http&region=us-east-1"


def s3(endpoint: str) -> pafs.S3FileSystem:
    return pafs.S3FileSystem(endpoint_override=endpoint, scheme="http", region="us-east-1", allow_bucket_creation=True,
                             access_key=ENV["AWS_ACCESS_KEY_ID"], secret_key=ENV["AWS_SECRET_ACCESS_KEY"])


def upload(fs, local: str, bucket_path: str) -> None:
    fs.create_dir(bucket_path.split("/")[0])
    for name in sorted(os.listdir(local)):
        with open(os.path.join(local, name), "rb") as src, fs.open_output_stream(f"{bucket_path}/{name}") as dst:
            dst.write(src.read())


class Reader(threading.Thread):
    """Lists a prefix again and again (every 50 ms) and reads each object version it lists (a new key or a
    new ETag) in one GET (boto3, as any S3 client would); records any that does not parse whole. A version
    is read as soon as it is listed: the moment a half-written object would be seen."""

    def __init__(self, endpoint, bucket, prefix):
        import boto3

        super().__init__(daemon=True)
        self.client = boto3.client("s3", endpoint_url=f"http://{endpoint}", region_name="us-east-1",
                                   aws_access_key_id=ENV["AWS_ACCESS_KEY_ID"],
                                   aws_secret_access_key=ENV["AWS_SECRET_ACCESS_KEY"])
        self.bucket, self.prefix, self.bad, self.seen = bucket, prefix, [], set()
        self.versions: set[tuple[str, str]] = set()
        self.stop = threading.Event()

    def run(self):
        while not self.stop.wait(0.05):
            listing = self.client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix).get("Contents", [])
            for item in listing:
                key, name = item["Key"], posixpath.basename(item["Key"])
                if fnmatch.fnmatch(name, TMP_GLOB) or (key, item["ETag"]) in self.versions:
                    continue  # temporary keys are never read: the final key appears by a server-side copy
                try:
                    data = self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
                except self.client.exceptions.NoSuchKey:
                    continue  # moved aside or released meanwhile
                self.seen.add(key)
                self.versions.add((key, item["ETag"]))
                try:
                    if name.endswith(".parquet"):
                        pq.read_table(pa.BufferReader(data))
                    elif name.endswith((".json", ".lock")):
                        json.loads(data)
                except (pa.ArrowException, ValueError) as exc:
                    self.bad.append((key, len(data), str(exc)[:100]))


@pytest.mark.slow
def test_a_sweep_from_and_to_s3_survives_a_killed_driver(ray_local, s3_server, attack_run, synthetic_dataset,
                                                         tiny_checkpoints, tmp_path):
    fs = s3(s3_server)
    upload(fs, synthetic_dataset, "pxr-data/synthetic")
    fs.create_dir("pxr-results")
    data, out = uri(s3_server, "pxr-data/synthetic"), uri(s3_server, "pxr-results/run")
    # the reference attack sweep's config (attack_run: the same sweep on a local disk), in and to buckets
    raw = attack_config(data, tiny_checkpoints, out, threads=1, save_adversarial=uri(s3_server, "pxr-results/adv"))
    config = tmp_path / "s3.toml"
    config.write_text(tomli_w.dumps(raw))
    env = {**os.environ, **ENV}
    env.pop("RAY_ADDRESS", None)
    cmd = sweep_command(config, ray_local)  # a driver of its own on the session's Ray (the cluster outlives it)
    reader = Reader(s3_server, "pxr-results", "run/")
    reader.start()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)

    def units(phase):
        found = fs.get_file_info(pafs.FileSelector(f"pxr-results/run/units/{phase}", recursive=True,
                                                   allow_not_found=True))
        return [i for i in found if i.type == pafs.FileType.File and i.path.endswith(".parquet")
                and not fnmatch.fnmatch(posixpath.basename(i.path), TMP_GLOB)]

    try:
        assert wait_for(lambda: len(units("clean")) >= 3, timeout=300), proc.stdout.read().decode()[-3000:]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver; Ray ends its workers
        proc.wait()
    killed_at = {phase: len(units(phase)) for phase in PHASES}
    assert fs.get_file_info("pxr-results/run/cells.parquet").type == pafs.FileType.NotFound, "finished too soon"
    time.sleep(1)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    reader.stop.set()
    reader.join(30)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "taking over a stale lease" in done.stderr  # the killed driver's lease, on this host, pid gone
    assert reader.bad == [], reader.bad
    assert len(reader.seen) > sum(killed_at.values())
    assert fs.get_file_info("pxr-results/run/run.lock").type == pafs.FileType.NotFound  # released

    adv = [uri(s3_server, f"pxr-results/adv/fgsm/{model_slug(m)}/eps{k}") for m in tiny_checkpoints
           for k in ATTACK["eps"]]
    for dataset in adv:  # the saved examples: pixelray data sets in the bucket, sound
        assert check_dataset(dataset) == [] and load_manifest(dataset).num_images > 0, dataset
    stats = json.loads(fs.open_input_stream("pxr-results/run/stats.json").read())
    for phase in PHASES:  # only the missing units were computed again
        assert stats["units_run"][phase] == len(units(phase)) - killed_at[phase], phase
    for phase in ("clean", "cells"):  # and all of them: as many as the local run's (attack units may stop early)
        assert len(units(phase)) == attack_run.stats["units_run"][phase], phase
    versions = ["pixelray_version", "torch_version", "config_hash"]  # the data path differs: so does the hash
    for name in ("cells", "clean", "attack", "transfer", "attack_ids"):
        remote = pq.read_table(uri(s3_server, f"pxr-results/run/{name}.parquet")).to_pandas()
        mine = pd.read_parquet(Path(attack_run.out_dir) / f"{name}.parquet")
        pd.testing.assert_frame_equal(remote.drop(columns=versions, errors="ignore"),
                                      mine.drop(columns=versions, errors="ignore"), obj=name)
