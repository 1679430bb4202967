"""``train-augment`` on a real local Ray Train: the claim with its control, faults, DDP shares, bad input.

The reference values come from outside the code under test: a plain single-process loop
written here (what one worker must compute), the sweep (itself checked against a plain
loop in test_sweep.py), the data read back with ``read_shard``, ``sha256`` of the files,
the test's own clock and the process table.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import time
from contextlib import chdir
from pathlib import Path

import pandas as pd
import pytest
import torch
from helpers import Scraper, console_script, spawn, train_driver, wait_for
from reference_perturb import apply_pixel_changes, hash64
from typer.testing import CliRunner

from pixelray.cli import app
from pixelray.config.sweep import parse_config
from pixelray.config.train import parse_train_config
from pixelray.core.spec import Cell, PixelChange
from pixelray.models import load_model, save_checkpoint
from pixelray.shards import read_shard, shard_uris
from pixelray.sweep import run_sweep
from pixelray.train.driver import run_train_augment
from pixelray.train.loop import TrainHooks

REPO = Path(__file__).resolve().parents[1]
COUNT = 512  # of 32 x 32 = 1,024 pixels: the tiny CNN on the synthetic images shrugs off fewer
EPOCHS = 3
MARGIN = 0.10  # the augmented fine-tune's wrong rate under COUNT changes is at least this much lower
CLEAN_DROP = 0.05  # and its clean held-out accuracy at most this much lower than the control's


def _raw(base, data, heldout, out, aug="pixels", epochs=EPOCHS, **run):
    return {
        "model": {"name": base},
        "data": {"path": str(data), "eval_path": str(heldout)},
        "augment": {"aug": aug, "count": COUNT},
        "train": {"epochs": epochs, "lr": 0.01, "batch_size": 32, "seed": 0},
        "run": {"workers": 1, "threads": 1, **run},
        "output": {"dir": str(out)},
    }


def _all(root):
    """(ids, labels, images) of every image of a data set, in file order, read here."""
    parts = [read_shard(uri) for uri in shard_uris(str(root))]
    return (torch.cat([p.image_ids for p in parts]), torch.cat([p.labels for p in parts]),
            torch.cat([p.images for p in parts]))


def epoch_key(seed, epoch):
    """The seed of an epoch's draws (what ``pixelray.core.augment.epoch_seed`` must give), written out here:
    the low 31 bits of SplitMix64 (reference_perturb's frozen copy) of ``seed * 1_000_003 + epoch + 0x5EEDE90C``."""
    return int(hash64(torch.tensor([seed * 1_000_003 + epoch + 0x5EED_E90C]))[0]) & (2**31 - 1)


def plain_fine_tune(base, data, epochs=EPOCHS, batch=32, lr=0.01, seed=0):
    """The fine-tune as one plain loop: what a single Ray Train worker must compute, step for step.

    Written here without the code under test (pixelray.train.loop, pixelray.core.augment): the epoch
    keys (:func:`epoch_key`), each epoch's order (``torch.randperm``), the pixel changes (the frozen draws
    of tests/reference_perturb.py), and the step (torch's cross entropy and SGD with momentum 0.9, the
    config's default). Shared with pixelray, because the weights must come out bit for bit the same:
    the model (``load_model``: the checkpoint, the network and the normalising wrapper it runs through)
    and the shard reader; and the cell's identity (``Cell.key``, the documented key of every draw), which
    reference_perturb hashes as the engine does.
    """
    ids, labels, images = _all(data)
    model = load_model(base)
    model.requires_grad_(True)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for epoch in range(1, epochs + 1):
            key = epoch_key(seed, epoch)
            order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(key * 64))
            cell = Cell(PixelChange(COUNT), seed=key)
            for start in range(0, len(ids), batch):
                pick = order[start:start + batch]
                loss = torch.nn.functional.cross_entropy(
                    model(apply_pixel_changes(images[pick], cell, ids[pick])), labels[pick])
                opt.zero_grad()
                loss.backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


@pytest.fixture(scope="module")
def heldout_dataset(tmp_path_factory):
    from pixelray.datasets.synthetic import make_synthetic

    root = tmp_path_factory.mktemp("heldout") / "synthetic-c10-n300-seed1"
    make_synthetic(root, classes=10, images=300, size=32, seed=1, rows_per_shard=100)
    return root


@pytest.fixture(scope="module")
def finetunes(ray_local, synthetic_dataset, heldout_dataset, tiny_checkpoints, tmp_path_factory):
    """The augmented fine-tune and its control, from the same base.

    The control runs here. The augmented one, at the same time, meets both faults, its paths all relative to
    its driver's directory (Ray Train's workers run elsewhere). Its driver is a process of its own on the
    session's Ray: its worker kills itself
    in epoch 2 (Ray Train restarts the group from epoch 1's checkpoint), then holds in epoch 3, once epoch 2's
    checkpoint is registered, until the driver is killed (SIGKILL: the cluster lives on, the job's actors
    die with it). The same command is then run again here, from the same directory, and resumes.
    """
    root = tmp_path_factory.mktemp("finetunes")
    died, held = root / "worker-died.json", root / "driver-held.json"
    rel = lambda path: os.path.relpath(path, root)  # noqa: E731 - every path relative to the driver's cwd
    base = "checkpoint:" + rel(tiny_checkpoints[0].split(":", 1)[1])
    raw = _raw(base, rel(synthetic_dataset), rel(heldout_dataset), "pixels")
    address = ray_local.get_runtime_context().gcs_address
    port = ray_local._private.worker.global_worker.node.metrics_export_port
    with Scraper(port) as scraped:  # what the workers export while they run (for the Grafana test)
        hooks = TrainHooks(die_in_epoch=2, marker=str(died), hold_in_epoch=3, hold_marker=str(held))
        driver = spawn(train_driver, str(root), raw, hooks, address)
        try:
            # meanwhile, on the session's other CPU: the control, here
            control_raw = _raw(tiny_checkpoints[0], synthetic_dataset, heldout_dataset, root / "none", "none")
            (control,) = run_train_augment(parse_train_config(control_raw), progress=False)
            assert wait_for(held.exists, timeout=300), f"the driver never reached epoch 3 (exit {driver.exitcode})"
        finally:
            killed_at = time.time()
            driver.kill()  # SIGKILL
            driver.join()
        lines: list[str] = []
        with chdir(root):  # the same command again, from the same directory
            (again,) = run_train_augment(parse_train_config(raw), address=address, log=lines.append)
        time.sleep(3)  # the last epoch's gauges reach the export (Ray keeps a dead worker's for ~10 s)
    configs = {"pixels": (raw, root), "none": (control_raw, None)}  # each raw config, and where it runs from
    in_root = {k: root / getattr(again, k) for k in ("run_dir", "model_path", "epochs_path")}  # relative to root
    runs = {"pixels": dataclasses.replace(again, **in_root), "none": control}
    faults = {"died": json.loads(died.read_text()), "held": json.loads(held.read_text()), "killed_at": killed_at,
              "lines": lines}
    return runs, faults, configs, scraped.seen


@pytest.fixture(scope="module")
def claim_sweep(finetunes, tiny_checkpoints, heldout_dataset, tmp_path_factory):
    runs = finetunes[0]
    models = [tiny_checkpoints[0], f"checkpoint:{runs['pixels'].run_dir}", f"checkpoint:{runs['none'].run_dir}"]
    cfg = parse_config({
        "data": {"path": str(heldout_dataset)}, "models": {"names": models, "weights": "none"},
        "eval": {"filter": "all"}, "grid": {"counts": [COUNT]},
        "output": {"dir": str(tmp_path_factory.mktemp("claim") / "sweep")}, "run": {"threads": 2},
    })
    result = run_sweep(cfg, progress=False)
    cells = pd.read_parquet(result.cells_path).set_index("model")
    clean = pd.read_parquet(result.clean_path).groupby("model").correct.mean()
    return models, cells, clean


@pytest.mark.slow
def test_train_augment_then_a_sweep_over_the_run_directory(finetunes, claim_sweep, synthetic_dataset,
                                                           heldout_dataset):
    runs, _, configs, _ = finetunes
    run = runs["pixels"].run_dir
    assert {"model.pt", "pixelray.json", "epochs.parquet", "run.json", "train"} <= {p.name for p in run.iterdir()}
    state = torch.load(run / "model.pt", weights_only=True)
    assert isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())
    side = json.loads((run / "pixelray.json").read_text())
    meta = side["metadata"]
    assert side["base"] == "tiny" and side["num_classes"] == 10
    assert meta["augment"]["change"]["count"] == COUNT and meta["head"] == "keep" and meta["label_space"] == 10
    assert (meta["epochs"], meta["lr"], meta["seed"]) == (EPOCHS, 0.01, 0)
    manifest = Path(synthetic_dataset) / "manifest.json"
    assert meta["data_manifest_sha256"] == hashlib.sha256(manifest.read_bytes()).hexdigest()
    assert set(meta["versions"]) == {"pixelray", "torch", "ray"}
    epochs = pd.read_parquet(run / "epochs.parquet")
    assert epochs.epoch.tolist() == list(range(1, EPOCHS + 1))
    assert (epochs.n_train == 600).all() and (epochs.n_heldout == 300).all()  # every image, read back: 600, 300
    assert meta["final"]["heldout_accuracy"] == epochs.heldout_accuracy.iloc[-1]

    # the held-out numbers of the last epoch, recomputed here from the saved model
    model = load_model(f"checkpoint:{run}")
    ids, labels, images = _all(heldout_dataset)
    with torch.inference_mode():
        clean = model(images).argmax(1) == labels
        changed = model(apply_pixel_changes(images, Cell(PixelChange(COUNT), 0), ids)).argmax(1) == labels
    assert epochs.heldout_accuracy.iloc[-1] == pytest.approx(clean.float().mean().item())
    assert epochs.heldout_wrong_rate.iloc[-1] == pytest.approx(((clean & ~changed).sum() / clean.sum()).item())

    models, cells, _ = claim_sweep
    assert len(cells) == 3 and set(cells.index) == set(models)  # the sweep scores checkpoint:RUN_DIR like any model
    assert (cells.n_images > 100).all()

    mtime = (run / "model.pt").stat().st_mtime_ns
    raw, where = configs["pixels"]
    with chdir(where):
        (again,) = run_train_augment(parse_train_config(raw), progress=False)  # the same command again: nothing to do
    assert again.skipped and (run / "model.pt").stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_the_augmented_fine_tune_breaks_less_than_its_control(claim_sweep):
    (base, augmented, control), cells, clean = claim_sweep
    wrong = cells.wrong_rate
    assert wrong[augmented] <= wrong[control] - MARGIN, wrong.to_dict()
    assert wrong[augmented] <= wrong[control] / 2, wrong.to_dict()
    assert clean[augmented] >= clean[control] - CLEAN_DROP, clean.to_dict()


@pytest.mark.slow
def test_a_worker_killed_in_epoch_2_resumes_from_the_epoch_1_checkpoint(finetunes, tiny_checkpoints,
                                                                          synthetic_dataset):
    runs, faults, _, _ = finetunes
    died = faults["died"]
    epochs = pd.read_parquet(runs["pixels"].epochs_path)
    assert epochs.epoch.tolist() == list(range(1, EPOCHS + 1))  # every epoch once
    assert died["epoch"] == 2
    first = epochs.set_index("epoch")
    assert first.pid[1] == died["pid"] and (first.pid[2:] != died["pid"]).all()  # epoch 1 by the killed worker
    assert first.finished[1] < died["time"] < first.started[2]  # epoch 2 redone after the death, epoch 1 not
    with pytest.raises(ProcessLookupError):
        os.kill(died["pid"], 0)
    # resuming lost nothing and repeated nothing: the weights are those of one uninterrupted plain loop, bit for bit
    reference = plain_fine_tune(tiny_checkpoints[0], synthetic_dataset).state_dict()
    trained = load_model(f"checkpoint:{runs['pixels'].run_dir}").state_dict()
    assert trained.keys() == reference.keys()
    assert all(torch.equal(trained[k], reference[k]) for k in reference), [
        k for k in reference if not torch.equal(trained[k], reference[k])]


@pytest.mark.slow
def test_two_workers_train_with_ddp_on_disjoint_images(ray_local, synthetic_dataset, heldout_dataset,
                                                       tiny_checkpoints, tmp_path):
    trace = tmp_path / "trace"
    trace.mkdir()
    raw = _raw(tiny_checkpoints[0], synthetic_dataset, heldout_dataset, tmp_path / "ddp", epochs=2, workers=2,
               cpus_per_worker=1)
    raw["model"]["head"] = "replace"  # and a new last layer, under DDP
    (result,) = run_train_augment(parse_train_config(raw), progress=False, hooks=TrainHooks(trace=str(trace)))
    ids, labels, _ = _all(synthetic_dataset)
    everything = set(ids.tolist())  # read here: 600 ids
    for epoch in (1, 2):
        seen = [(trace / f"epoch{epoch}-rank{r}.txt").read_text().split() for r in (0, 1)]
        assert [len(s) for s in seen] == [300, 300]
        assert all(len(set(s)) == len(s) for s in seen)  # each image once per epoch
        assert not set(seen[0]) & set(seen[1])  # disjoint
        assert {int(i) for s in seen for i in s} == everything  # together: every training image
    epochs = pd.read_parquet(result.epochs_path)
    assert (epochs.workers == 2).all() and (epochs.n_train == 600).all() and (epochs.n_heldout == 300).all()
    assert epochs.heldout_accuracy.iloc[-1] > 0.5
    side = json.loads((result.run_dir / "pixelray.json").read_text())
    assert side["label_map"] == {"labels": sorted(set(labels.tolist())), "num_classes": 10}
    assert type(load_model(f"checkpoint:{result.run_dir}").net).__name__ == "LabelMap"


@pytest.mark.slow
def test_killing_the_driver_then_rerunning_resumes_from_the_last_checkpoint(finetunes):
    """The augmented fine-tune's driver was killed (SIGKILL) in epoch 3, once epoch 2's checkpoint was registered;
    the same command, run again from the same directory (relative paths), went on from there."""
    runs, faults, _, _ = finetunes
    held, t_kill, lines = faults["held"], faults["killed_at"], "\n".join(faults["lines"])
    assert held["epoch"] == 3 and held["time"] < t_kill
    assert "resuming" in lines and "pixels epoch 3/3: loss" in lines, lines  # a progress line per epoch
    epochs = pd.read_parquet(runs["pixels"].epochs_path)
    assert epochs.epoch.tolist() == [1, 2, 3]  # every epoch once
    # kept from the killed run: the epochs up to the last registered checkpoint (epoch 2's), not started over
    assert epochs[epochs.finished < t_kill].epoch.tolist() == [1, 2]
    assert (epochs[epochs.epoch == 3].started > t_kill).all()  # only the rest trained again
    with pytest.raises(ProcessLookupError):
        os.kill(held["pid"], 0)  # the held worker died with its driver
    assert load_model(f"checkpoint:{runs['pixels'].run_dir}").num_classes == 10


# ---------------------------------------------------------------------------- bad input


def _invoke(*args):
    return CliRunner().invoke(app, ["train-augment", *map(str, args)], prog_name="pixelray")


def _refused(result, match):
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)  # a clean exit, no traceback
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert match in lines[0], lines[0]


@pytest.fixture(scope="module")
def twelve_classes(tmp_path_factory):
    from pixelray.datasets.synthetic import make_synthetic

    root = tmp_path_factory.mktemp("c12") / "data"
    make_synthetic(root, classes=12, images=120, size=32, seed=0, rows_per_shard=120)
    return root


def _checkpoint_with(tmp_path, payload) -> str:
    """A checkpoint file holding ``payload`` beside a valid sidecar (so only the file itself is wrong)."""
    good = save_checkpoint(load_model("tiny", None), tmp_path / "good.pt", base="tiny")
    bad = tmp_path / "bad.pt"
    torch.save(payload, bad)  # torch's own format: a zip holding a pickle
    side = json.loads(good.with_name("good.pt.json").read_text())
    del side["sha256"]
    (tmp_path / "bad.pt.json").write_text(json.dumps(side))
    return f"checkpoint:{bad}"


class _Executes:
    """Unpickling this calls os.mkdir(path): the kind of payload weights_only=True must refuse unexecuted."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("unknown model", "[model] name = 'resnet1010'"),
        ("missing data", "cannot read the manifest"),
        ("count 0", "[augment] count: 0 is invalid; it must be an integer >= 1"),
        ("count above the area", "count: 2000 is larger than the 32x32 = 1024 pixels it may change"),
        ("epochs 0", "[train] epochs = 0: an integer >= 1"),
        ("lr 0", "[train] lr = 0.0: a positive learning rate"),
        ("lr negative", "[train] lr = -0.001: a positive learning rate"),
        ("keep with more labels", "head = 'keep': the training images have labels [10, 11]"),
        ("not a state_dict", "not a state_dict of tensors"),
        ("arbitrary pickle", "not a weights-only state_dict"),
        ("another config's run", "holds a run of another config"),
        ("a sweep's directory", "holds a run of another config"),
    ],
)
def test_bad_input_is_refused_in_one_line_before_anything_is_written(case, match, synthetic_dataset, twelve_classes,
                                                                     tiny_checkpoints, tmp_path):
    out = tmp_path / "out"
    flags = {"--model": "tiny", "--weights": "none", "--data": synthetic_dataset, "--count": 4, "--epochs": 1,
             "--out": out}
    executed = tmp_path / "executed"
    if case == "unknown model":
        flags["--model"] = "resnet1010"
    elif case == "missing data":
        flags["--data"] = tmp_path / "no-such-data"
    elif case == "count 0":
        flags["--count"] = 0
    elif case == "count above the area":
        flags["--count"] = 2000
    elif case == "epochs 0":
        flags["--epochs"] = 0
    elif case in ("lr 0", "lr negative"):
        flags["--lr"] = 0 if case == "lr 0" else -0.001
    elif case == "keep with more labels":
        flags.update({"--model": tiny_checkpoints[0], "--data": twelve_classes})
    elif case == "not a state_dict":
        flags["--model"] = _checkpoint_with(tmp_path, ["not", "tensors"])
    elif case == "arbitrary pickle":
        flags["--model"] = _checkpoint_with(tmp_path, {"x": _Executes(str(executed))})
    else:
        out.mkdir()
        hashed = {"kind": "train-augment", "config_hash": "0123456789abcdef"}
        (out / "run.json").write_text(json.dumps(hashed if case == "another config's run" else {"config_hash": "x"}))
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    args = [a for key, value in flags.items() for a in (key, value)]
    _refused(_invoke(*args), match)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written
    assert not executed.exists()  # the pickle was refused, not run


def test_the_console_script_prints_one_line_and_no_traceback(tmp_path):
    exe = console_script()
    done = subprocess.run([str(exe), "train-augment", "--model", "tiny", "--weights", "none", "--data",
                           str(tmp_path / "none"), "--count", "4", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: [data] path")
    assert "Traceback" not in done.stderr and done.stdout == ""
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- heads


@pytest.mark.parametrize("arch", ["tiny", "resnet18", "squeezenet1_1"])
def test_a_replaced_head_is_new_and_everything_else_is_the_models_own(arch, tmp_path):
    from pixelray.models import LabelMap
    from pixelray.train.loop import replace_head

    model = load_model(arch, None, num_classes=10 if arch == "tiny" else None, init_seed=1)  # stands in for weights
    new = replace_head(model, arch, [1, 3, 5], 10, seed=0)
    assert isinstance(new.net, LabelMap) and new.net.labels == (1, 3, 5) and new.num_classes == 10
    old, fresh = model.net.state_dict(), new.net.net.state_dict()
    changed = sorted(k for k in old if old[k].shape != fresh[k].shape or not torch.equal(old[k], fresh[k]))
    head = {"tiny": "classifier", "resnet18": "fc", "squeezenet1_1": "classifier.1"}[arch]
    assert changed == [f"{head}.bias", f"{head}.weight"]  # only the last layer differs
    assert fresh[f"{head}.weight"].shape[0] == 3
    x = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    with torch.inference_mode():
        assert set(new(x).argmax(1).tolist()) <= {1, 3, 5}


def test_resuming_over_data_that_changed_is_refused(synthetic_dataset, tmp_path):
    from pixelray.config.train import load_train_config
    from pixelray.train.driver import TrainError, prepare_run

    out = tmp_path / "out"
    flags = ["--model", "tiny", "--weights", "none", "--data", synthetic_dataset, "--count", 4, "--out", out]
    (run,) = load_train_config(None, {"model": "tiny", "weights": "none", "data": synthetic_dataset, "count": 4,
                                      "output_dir": str(out)}).runs
    out.mkdir()
    manifest = hashlib.sha256((Path(synthetic_dataset) / "manifest.json").read_bytes()).hexdigest()
    meta = {"kind": "train-augment", "config_hash": run.config_hash, "data_manifest_sha256": manifest}
    (out / "run.json").write_text(json.dumps(meta))
    assert prepare_run(run).state == "resume"  # the same data: a rerun resumes
    (out / "run.json").write_text(json.dumps({**meta, "data_manifest_sha256": "0" * 64}))
    with pytest.raises(TrainError):
        prepare_run(run)
    _refused(_invoke(*flags), "was trained on other data (data_manifest_sha256 000000000000... differs")
    assert sorted(p.name for p in out.iterdir()) == ["run.json"]


@pytest.mark.slow
def test_the_grafana_train_panels_query_what_a_fine_tune_exports(finetunes):
    """Every ``ray_pixelray_train_*`` metric of cluster/grafana-dashboard.json, scraped from Ray's metrics
    export of this session's Ray while the fine-tunes above ran (the workers report through ray.util.metrics)."""
    from helpers import grafana_queries, promql_metric_names

    wanted = {name for _, expr in grafana_queries(REPO / "cluster" / "grafana-dashboard.json")
              for name in promql_metric_names(expr) if name.startswith("ray_pixelray_train_")}
    assert len(wanted) >= 4
    seen = finetunes[3]
    assert wanted <= seen, sorted(wanted - seen)
