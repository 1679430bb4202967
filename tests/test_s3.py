"""s3:// for real: data read from and results written to buckets of an S3-compatible server on 127.0.0.1.

The server is moto's (``moto[server]``). A sweep reads its shards from one bucket and writes its
unit files and tables to another; its driver is killed mid-run and rerun; a reader that keeps
reading every object under the output prefix never sees a half-written one; and the tables
equal those of the same sweep on a local disk.
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
from helpers import sweep_command, wait_for

from pixelray.config.sweep import parse_config
from pixelray.engine.units import model_slug
from pixelray.shards import check_dataset, load_manifest
from pixelray.store.atomic import TMP_GLOB
from pixelray.sweep import run_sweep

ENV = {"AWS_ACCESS_KEY_ID": "pixelray-test", "AWS_SECRET_ACCESS_KEY": "pixelray-test",
       "AWS_EC2_METADATA_DISABLED": "true", "RAY_USAGE_STATS_ENABLED": "0"}
GRID = {"counts": [8, 200], "amplitudes": ["full", 60]}


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
    """Reads every final object under a prefix again and again, each in one GET (boto3, as any S3 client
    would), and records any that does not parse whole."""

    def __init__(self, endpoint, bucket, prefix):
        import boto3

        super().__init__(daemon=True)
        self.client = boto3.client("s3", endpoint_url=f"http://{endpoint}", region_name="us-east-1",
                                   aws_access_key_id=ENV["AWS_ACCESS_KEY_ID"],
                                   aws_secret_access_key=ENV["AWS_SECRET_ACCESS_KEY"])
        self.bucket, self.prefix, self.bad, self.seen = bucket, prefix, [], set()
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            listing = self.client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix).get("Contents", [])
            for item in listing:
                key, name = item["Key"], posixpath.basename(item["Key"])
                if fnmatch.fnmatch(name, TMP_GLOB):
                    continue  # temporary keys are never read: the final key appears by a server-side copy
                try:
                    data = self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
                except self.client.exceptions.NoSuchKey:
                    continue  # moved aside or released meanwhile
                self.seen.add(key)
                try:
                    if name.endswith(".parquet"):
                        pq.read_table(pa.BufferReader(data))
                    elif name.endswith((".json", ".lock")):
                        json.loads(data)
                except (pa.ArrowException, ValueError) as exc:
                    self.bad.append((key, len(data), str(exc)[:100]))


@pytest.mark.slow
def test_a_sweep_from_and_to_s3_survives_a_killed_driver(ray_local, s3_server, synthetic_dataset, tiny_checkpoints,
                                                         tmp_path):
    fs = s3(s3_server)
    upload(fs, synthetic_dataset, "pxr-data/synthetic")
    fs.create_dir("pxr-results")
    data, out = uri(s3_server, "pxr-data/synthetic"), uri(s3_server, "pxr-results/run")
    raw = {
        "data": {"path": data},
        "models": {"names": list(tiny_checkpoints), "weights": "none"},
        "eval": {"filter": "all", "batch_size": 64, "size": 300},
        "grid": GRID,
        "attack": {"kind": "fgsm", "eps": [16], "size": 20},
        "output": {"dir": out, "save_adversarial": uri(s3_server, "pxr-results/adv")},
        "run": {"threads": 1},
    }
    config = tmp_path / "s3.toml"
    config.write_text(tomli_w.dumps(raw))
    env = {**os.environ, **ENV}
    env.pop("RAY_ADDRESS", None)
    cmd = sweep_command(config, ray_local)  # a driver of its own on the session's Ray (the cluster outlives it)
    reader = Reader(s3_server, "pxr-results", "run/")
    reader.start()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)

    def cells_units():
        found = fs.get_file_info(pafs.FileSelector("pxr-results/run/units/cells", recursive=True, allow_not_found=True))
        return [i for i in found if i.type == pafs.FileType.File and i.path.endswith(".parquet")
                and not fnmatch.fnmatch(posixpath.basename(i.path), TMP_GLOB)]

    try:
        assert wait_for(lambda: len(cells_units()) >= 2, timeout=300), proc.stdout.read().decode()[-3000:]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver; Ray ends its workers
        proc.wait()
    killed_at = len(cells_units())
    assert fs.get_file_info("pxr-results/run/cells.parquet").type == pafs.FileType.NotFound, "finished too soon"
    time.sleep(1)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    reader.stop.set()
    reader.join(30)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "taking over a stale lease" in done.stderr  # the killed driver's lease, on this host, pid gone
    assert reader.bad == [], reader.bad
    assert len(reader.seen) > killed_at
    assert fs.get_file_info("pxr-results/run/run.lock").type == pafs.FileType.NotFound  # released

    adv = [uri(s3_server, f"pxr-results/adv/fgsm/{model_slug(m)}/eps16") for m in tiny_checkpoints]
    for dataset in adv:  # the saved examples: a pixelray data set in the bucket, sound
        assert check_dataset(dataset) == [] and load_manifest(dataset).num_images > 0, dataset
    local_raw = {**raw, "data": {"path": synthetic_dataset}, "output": {"dir": str(tmp_path / "local")}}
    local = run_sweep(parse_config(local_raw), progress=False)
    stats = json.loads(fs.open_input_stream("pxr-results/run/stats.json").read())
    assert stats["units_run"]["cells"] == local.stats["units_run"]["cells"] - killed_at  # only the missing ones
    versions = ["pixelray_version", "torch_version", "config_hash"]  # the data path differs: so does the hash
    for name in ("cells", "clean", "attack", "transfer"):
        remote = pq.read_table(uri(s3_server, f"pxr-results/run/{name}.parquet")).to_pandas()
        mine = pd.read_parquet(Path(local.out_dir) / f"{name}.parquet")
        pd.testing.assert_frame_equal(remote.drop(columns=versions, errors="ignore"),
                                      mine.drop(columns=versions, errors="ignore"))
