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
import torch
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


def _fine_tune(base: str, data: str, out: str, count) -> dict:
    return {"model": {"name": base}, "data": {"path": data}, "augment": {"aug": "pixels", "count": count},
            "train": {"epochs": 2, "batch_size": 64, "seed": 0}, "run": {"workers": 1, "threads": 1},
            "output": {"dir": out}}


@pytest.fixture(scope="module")
def local_pair(ray_local, synthetic_dataset, tiny_checkpoints, tmp_path_factory):
    """Two fine-tunes of one CPU worker each (counts 16 and 64) on a local disk, on the session's Ray of two
    CPUs: side by side. n64 is the reference of the run in a bucket."""
    from pixelray.config.train import parse_train_config
    from pixelray.train.driver import run_train_augment

    root = tmp_path_factory.mktemp("pair")
    said: list[str] = []
    raw = _fine_tune(tiny_checkpoints[0], synthetic_dataset, str(root / "pair"), [16, 64])
    return run_train_augment(parse_train_config(raw), progress=False, log=said.append), said


@pytest.fixture(scope="module")
def s3_fine_tune(ray_local, s3_server, synthetic_dataset, tiny_checkpoints, tmp_path_factory):
    """count 64 into a bucket, alone; its worker dies in epoch 2 (once epoch 1's checkpoint is in)."""
    from pixelray.config.train import parse_train_config
    from pixelray.train.driver import run_train_augment
    from pixelray.train.loop import TrainHooks

    s3(s3_server).create_dir("pxr-ft")
    out = uri(s3_server, "pxr-ft/run")
    died = tmp_path_factory.mktemp("s3ft") / "died.json"
    said: list[str] = []
    (result,) = run_train_augment(parse_train_config(_fine_tune(tiny_checkpoints[0], synthetic_dataset, out, 64)),
                                  progress=True, log=said.append, hooks=TrainHooks(die_in_epoch=2, marker=str(died)))
    return result, out, json.loads(died.read_text()), said


def _same_network(a: str, b: str) -> bool:
    from pixelray.models import load_model

    nets = [load_model(f"checkpoint:{where}").net.state_dict() for where in (a, b)]
    return nets[0].keys() == nets[1].keys() and all(torch.equal(nets[0][k], nets[1][k]) for k in nets[0])


@pytest.mark.slow
def test_a_list_of_counts_trains_side_by_side_where_the_cluster_has_room_each_as_it_would_alone(local_pair,
                                                                                              s3_fine_tune):
    results, said = local_pair
    assert "2 fine-tunes, 2 at a time: the cluster has (or can add) room for the workers of 2" in said, said
    assert [r.run_dir.name for r in results] == ["n16", "n64"]  # the config's order
    spans = [pd.read_parquet(r.epochs_path) for r in results]
    spans = [(e.started.min(), e.finished.max()) for e in spans]
    assert spans[0][0] < spans[1][1] and spans[1][0] < spans[0][1], spans  # they overlapped
    # n64, trained beside n16, is the network the same fine-tune gave alone (in a bucket, resumed once)
    assert _same_network(str(results[1].run_dir), s3_fine_tune[1])


@pytest.mark.slow
def test_train_augment_to_s3_resumes_a_killed_worker_from_s3_and_the_sweep_evaluates_it(
        s3_server, s3_fine_tune, local_pair, synthetic_dataset, tmp_path):
    """The fine-tune's run directory in a bucket (Ray Train's storage on pyarrow's S3 filesystem): its worker
    dies in epoch 2 and the group resumes from epoch 1's checkpoint read back from the bucket; model.pt,
    pixelray.json and epochs.parquet land there; its figures, its network and a sweep of checkpoint:s3://...
    equal those of the same fine-tune on a local disk, run without a fault."""
    from pixelray.config.sweep import parse_config
    from pixelray.sweep import run_sweep

    remote, out, death, said = s3_fine_tune
    local = local_pair[0][1]  # n64
    fs = s3(s3_server)
    assert death["epoch"] == 2  # the worker did die, once epoch 1's checkpoint was in
    listed = {i.path.removeprefix("pxr-ft/run/") for i in fs.get_file_info(
        pafs.FileSelector("pxr-ft/run", recursive=True)) if i.type == pafs.FileType.File}
    assert {"model.pt", "pixelray.json", "epochs.parquet", "run.json"} <= listed, sorted(listed)
    assert any(p.startswith("train/epoch-0001/") for p in listed), sorted(listed)  # Ray Train's, in the bucket
    assert not [p for p in listed if fnmatch.fnmatch(posixpath.basename(p), TMP_GLOB)]
    assert remote.run_dir == out and str(remote.model_path).startswith("s3://pxr-ft/run/model.pt")
    assert [line for line in said if " epoch 2/2: loss " in line], said  # epoch 2 ran again, and said so

    with fs.open_input_stream("pxr-ft/run/epochs.parquet") as f:
        epochs = pq.read_table(pa.BufferReader(f.read())).to_pandas()
    # resumed, not started over: epoch 1 is the one trained before the death, epoch 2 the one trained after
    assert epochs.finished[0] < death["time"] < epochs.started[1], (epochs[["started", "finished"]], death)
    figures = ["epoch", "loss", "train_accuracy", "heldout_accuracy", "heldout_wrong_rate"]
    assert epochs[figures].equals(pd.read_parquet(local.epochs_path)[figures])
    assert _same_network(out, str(local.run_dir))

    cells = {}
    for name, model in (("s3", f"checkpoint:{out}"), ("local", f"checkpoint:{local.run_dir}")):
        cfg = parse_config({"data": {"path": synthetic_dataset}, "models": {"names": [model], "weights": "none"},
                            "eval": {"filter": "all", "size": 200}, "grid": {"counts": [64, 256]},
                            "output": {"dir": str(tmp_path / f"sweep-{name}")}, "run": {"device": "cpu"}})
        table = pd.read_parquet(run_sweep(cfg, progress=False).cells_path)
        cells[name] = table[["cell_id", "n_images", "n_wrong", "accuracy"]].reset_index(drop=True)
    assert cells["s3"].equals(cells["local"]), cells
