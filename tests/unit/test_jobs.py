"""The bundled training jobs (jobs/*.py): file parsing in-process, everything else as real runs.

The jobs run as subprocesses with this interpreter on the CPU, on small synthetic data in the real
file formats (tests/datagen.py): data errors, dry runs, a short training run, resume, preemption by
signal with requeue, and a two-process gloo DDP run with torchrun-style variables.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[2]
JOBS = ROOT / "jobs"
MNIST = JOBS / "mnist_lenet5.py"
CIFAR = JOBS / "cifar10_resnet.py"
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(JOBS))
_dont_write = sys.dont_write_bytecode
sys.dont_write_bytecode = True  # no __pycache__ inside jobs/ (it ships in the wheel)
import datagen  # noqa: E402
import hpctrain  # noqa: E402
import mnist_lenet5  # noqa: E402

sys.dont_write_bytecode = _dont_write

SHA_RE = re.compile(r"rank (\d+) final-weights-sha256 ([0-9a-f]{64})")
SHARD_RE = re.compile(r"rank (\d+) shard epoch \d+ size \d+ first \[([\d, ]*)\] sha256 ([0-9a-f]{64})")
# Variables that would make a job think it is part of a distributed launch or a Slurm job.
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "HPCLAUNCH_RUN_DIR")


def job_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("SLURM_")}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.update(extra)
    return env


def run_job(
    script: Path,
    *args: str | Path,
    env: dict[str, str] | None = None,
    timeout: float = 120,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(script), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env or job_env(),
        cwd=cwd,
        check=False,
    )


def metrics_epochs(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.csv").read_text().splitlines()
    assert lines[0] == "epoch,loss,accuracy,images_per_s,elapsed_s,compile_s"
    return [int(line.split(",")[0]) for line in lines[1:]]


def final_sha(stdout: str) -> dict[int, str]:
    return {int(r): h for r, h in SHA_RE.findall(stdout)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return datagen.write_mnist(tmp_path_factory.mktemp("mnist"), n_train=4000, n_test=1000, gz=True)


# Two short epochs of LeNet-5 on scikit-learn's real digits (1,437 train, 360 test): the reference run
# several tests compare with. Real scans, so a broken model or loader shows as lost accuracy.
TRAIN_ARGS = ("--epochs", "2", "--batch-size", "16", "--seed", "3")
DIGITS = ("--dataset", "digits")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    pytest.importorskip("sklearn")
    run_dir = tmp_path_factory.mktemp("run")
    proc = run_job(MNIST, *DIGITS, "--run-dir", run_dir, *TRAIN_ARGS)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return run_dir, proc.stdout


# ---------------------------------------------------------------------------------------------- files


def test_read_idx_raw_and_gzip_agree(tmp_path: Path) -> None:
    raw = datagen.write_mnist(tmp_path / "raw", n_train=50, n_test=20, gz=False)
    gz = datagen.write_mnist(tmp_path / "gz", n_train=50, n_test=20, gz=True)
    assert (raw / "train-images-idx3-ubyte").is_file() and (gz / "train-images-idx3-ubyte.gz").is_file()
    (tr_raw, te_raw), (tr_gz, te_gz) = hpctrain.load_mnist(raw), hpctrain.load_mnist(gz)
    assert tr_raw.images.shape == (50, 1, 28, 28) and tr_raw.images.dtype == torch.uint8
    assert te_raw.labels.shape == (20,) and te_raw.labels.dtype == torch.int64
    assert torch.equal(tr_raw.images, tr_gz.images) and torch.equal(te_raw.labels, te_gz.labels)
    images, labels = datagen.make_images(50, channels=1, size=28, seed=0)
    assert torch.equal(tr_raw.images[:, 0], torch.from_numpy(images[:, 0]))
    assert tr_raw.labels.tolist() == labels.tolist()


def test_read_idx_any_shape(tmp_path: Path) -> None:
    import numpy as np

    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = datagen.write_idx(tmp_path / "x-idx3-ubyte", arr, gz=True)
    assert hpctrain.read_idx(path).tolist() == arr.tolist()


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"\x00\x00\x08\x01\x00\x00\x00\x05abc", "size mismatch"),
        (b"\x00\x00\x0d\x01\x00\x00\x00\x01abcd", "unsupported"),
        (b"PK\x03\x04 not idx", "bad magic"),
        (b"\x1f\x8b\x08 broken gzip", "corrupt gzip"),
    ],
)
def test_read_idx_rejects_bad_files(tmp_path: Path, payload: bytes, message: str) -> None:
    path = tmp_path / "bad"
    path.write_bytes(payload)
    with pytest.raises(hpctrain.DataError, match=message):
        hpctrain.read_idx(path)


def test_mnist_torchvision_layout_and_missing_file_named(tmp_path: Path) -> None:
    datagen.write_mnist(tmp_path / "MNIST" / "raw", n_train=30, n_test=10)
    train, test = hpctrain.load_mnist(tmp_path)
    assert (len(train), len(test)) == (30, 10)
    (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(hpctrain.DataError) as err:
        hpctrain.load_mnist(tmp_path)
    assert str(err.value).startswith(f"missing t10k-labels-idx1-ubyte in {tmp_path}:")


@pytest.mark.parametrize("subdir", [True, False])
def test_cifar_batches(tmp_path: Path, subdir: bool) -> None:
    datagen.write_cifar10(tmp_path, n_train=50, n_test=20, subdir=subdir)
    train, test = hpctrain.load_cifar10(tmp_path)
    assert train.images.shape == (50, 3, 32, 32) and test.images.shape == (20, 3, 32, 32)
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    # Batches are concatenated in order and the 3072 bytes are R, G, B planes, row-major.
    images, labels = datagen.make_images(50, channels=3, size=32, seed=0)
    assert torch.equal(train.images, torch.from_numpy(images))
    assert train.labels.tolist() == labels.tolist()


def test_cifar_batch_with_str_keys(tmp_path: Path) -> None:
    import pickle

    import numpy as np

    path = tmp_path / "batch"
    data = np.zeros((2, 3072), dtype=np.uint8)
    data[1, 1024] = 7  # first green pixel of image 1
    path.write_bytes(pickle.dumps({"data": data, "labels": [3, 4]}))
    split = hpctrain.read_cifar_batch(path)
    assert split.labels.tolist() == [3, 4] and int(split.images[1, 1, 0, 0]) == 7


# --------------------------------------------------------------------------------- command line


def test_help_shows_flags_and_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        mnist_lenet5.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in (
        "--epochs",
        "--batch-size",
        "--lr",
        "--seed",
        "--dry-run",
        "--run-dir",
        "--data-dir",
        "--limit-train",
        "--limit-test",
        "--no-compile",
        "--no-amp",
        "--no-channels-last",
        "--requeue-on-signal",
        "--max-requeues",
        "--cuda-graphs",
        "--compile-mode",
        "--no-scale-lr",
    ):
        assert flag in out
    assert "(default: 128 on CPU, 1024 on a GPU" in " ".join(out.split()) and "HPCLAUNCH_RUN_DIR" in out
    assert "{mnist,digits,synthetic}" in out


@pytest.mark.parametrize("script", [MNIST, CIFAR], ids=["mnist", "cifar10"])
def test_missing_data_is_one_line_exit_2(script: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_job(script, "--data-dir", empty, "--run-dir", tmp_path / "run")
    assert proc.returncode == hpctrain.EXIT_USAGE
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr and lines[0].startswith(f"{script.name}: error: ")
    names = hpctrain.MNIST_FILES if script == MNIST else (*hpctrain.CIFAR10_TRAIN_FILES, "test_batch")
    assert all(name in lines[0] for name in names) and str(empty) in lines[0]
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


@pytest.mark.parametrize("script", [MNIST, CIFAR], ids=["mnist", "cifar10"])
def test_dry_run(script: Path, tmp_path: Path) -> None:
    # Staged as hpclaunch does (the script plus the shared modules, nothing else), started from elsewhere.
    stage = tmp_path / "stage"
    stage.mkdir()
    from hpclaunch.train import SHARED_MODULES

    for f in (script, *(JOBS / name for name in SHARED_MODULES)):
        shutil.copy(f, stage / f.name)
    args = "--dataset synthetic --limit-train 300 --limit-test 100 --batch-size 32 --dry-run".split()
    proc = run_job(stage / script.name, *args, "--run-dir", tmp_path / "run", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "dry run ok: 1 training batch" in proc.stdout
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------- training


def test_short_mnist_run_learns_and_writes_results(trained: tuple[Path, str]) -> None:
    run_dir, stdout = trained
    assert re.search(r"^epoch 1/2 loss [\d.]+ test_acc [\d.]+ images/s \d+ elapsed [\d.]+s$", stdout, re.M)
    assert metrics_epochs(run_dir) == [1, 2]
    last = (run_dir / "metrics.csv").read_text().splitlines()[-1].split(",")
    assert float(last[2]) > 0.88, stdout  # test accuracy on real digits (0.92 when written)
    assert float(last[3]) > 0 and float(last[4]) > 0
    png = (run_dir / "plot.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["step"] == 0 and len(ckpt["history"]) == 2
    assert {"model", "optimizer", "rng"} <= ckpt.keys()
    model = mnist_lenet5.LeNet5()
    model.load_state_dict(torch.load(run_dir / "model.pt", weights_only=True))
    assert hpctrain.weights_sha256(model) == final_sha(stdout)[0]
    assert not list(run_dir.glob(".*tmp*")), "temporary files left behind"


def test_resume_continues_without_redoing_an_epoch(trained: tuple[Path, str], tmp_path: Path) -> None:
    common = (*DIGITS, "--run-dir", tmp_path, *TRAIN_ARGS[2:])
    first = run_job(MNIST, *common, "--epochs", "1")
    assert first.returncode == 0, first.stdout + first.stderr
    assert metrics_epochs(tmp_path) == [1]
    second = run_job(MNIST, *common, "--epochs", "2")
    assert second.returncode == 0, second.stdout + second.stderr
    assert "resumed from epoch 1" in second.stdout and "epoch 1/2" not in second.stdout
    assert metrics_epochs(tmp_path) == [1, 2]
    # Bit-identical to the uninterrupted two-epoch run: same weights, nothing lost or repeated.
    assert final_sha(second.stdout)[0] == final_sha(trained[1])[0]


def _fake_scontrol(tmp_path: Path) -> tuple[Path, Path]:
    bindir, calls = tmp_path / "bin", tmp_path / "scontrol.calls"
    bindir.mkdir()
    script = bindir / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    script.chmod(0o755)
    return bindir, calls


def _wait_for(proc: subprocess.Popen[str], pattern: str, timeout: float = 60) -> str:
    """Read proc's stdout until a line matches; returns what was read."""
    assert proc.stdout is not None
    seen = ""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen += line
        if re.search(pattern, line):
            return seen
    raise AssertionError(f"no line matching {pattern!r} in:\n{seen}")


# A run long enough to be interrupted: small batches, many steps.
SIGNAL_ARGS = tuple(
    "--dataset synthetic --limit-train 6000 --limit-test 500 --epochs 2 --batch-size 64 --seed 5".split()
)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGUSR2, signal.SIGTERM], ids=["SIGUSR2", "SIGTERM"])
def test_signal_checkpoints_requeues_and_resumes(tmp_path: Path, signum: signal.Signals) -> None:
    bindir, calls = _fake_scontrol(tmp_path)
    run_dir = tmp_path / "run"
    # One thread everywhere: the runs compared bit for bit must reduce in the same order.
    path = f"{bindir}{os.pathsep}{os.environ['PATH']}"
    env = job_env(PATH=path, SLURM_JOB_ID="4242", SLURM_RESTART_COUNT="0", OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(MNIST), *SIGNAL_ARGS]
    requeue = ["--requeue-on-signal", "--max-requeues", "2"]
    straight = None
    if signum == signal.SIGUSR2:  # the uninterrupted reference run, alongside
        straight = subprocess.Popen(
            [*cmd, "--run-dir", str(tmp_path / "straight")],
            env=job_env(OMP_NUM_THREADS="1"),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    with subprocess.Popen(
        [*cmd, "--run-dir", str(run_dir), *requeue],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    ) as proc:
        out = _wait_for(proc, r"^rank 0 shard epoch 1")
        time.sleep(0.3)
        proc.send_signal(signum)
        rest, _ = proc.communicate(timeout=60)
    out += rest
    assert proc.returncode == hpctrain.EXIT_PREEMPTED == 75, out
    assert f"preempted at epoch 1, checkpoint written ({signum.name})" in out
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 0 and ckpt["step"] > 0, "expected a stop inside epoch 1"
    if straight is None:  # SIGTERM is a cancel or a hard stop: never requeue on it
        assert not calls.exists()
        return
    assert calls.read_text() == "requeue 4242\n"
    assert "requeueing job 4242 (restart 1 of at most 2)" in out

    # The requeued job picks up inside epoch 1; the result equals the uninterrupted run's.
    resumed = run_job(MNIST, *SIGNAL_ARGS, "--run-dir", run_dir, env=job_env(OMP_NUM_THREADS="1"))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resumed from epoch 0 (continuing inside epoch 1 at step {ckpt['step']})" in resumed.stdout
    assert metrics_epochs(run_dir) == [1, 2]
    straight_out = straight.communicate(timeout=120)[0]
    assert straight.returncode == 0, straight_out
    assert final_sha(resumed.stdout)[0] == final_sha(straight_out)[0]


def test_requeue_decision() -> None:
    assert hpctrain.requeue_decision({}, 3)[0] is None
    assert hpctrain.requeue_decision({"SLURM_JOB_ID": "7"}, 3) == (
        "7",
        "requeueing job 7 (restart 1 of at most 3)",
    )
    job, why = hpctrain.requeue_decision({"SLURM_JOB_ID": "7", "SLURM_RESTART_COUNT": "3"}, 3)
    assert job is None and "reached --max-requeues 3" in why


# ------------------------------------------------------------------------------------- distributed


def test_dist_env_from_slurm_step(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in (*LAUNCH_VARS, "SUBMITIT_EXECUTOR", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(var, raising=False)
    slurm = {
        "SLURM_JOB_ID": "123456",
        "SLURM_PROCID": "3",
        "SLURM_LOCALID": "1",
        "SLURM_NTASKS": "4",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_NODEID": "1",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_STEP_ID": "0",
    }
    for k, v in slurm.items():
        monkeypatch.setenv(k, v)
    env = hpctrain.read_dist_env()
    assert env == hpctrain.DistEnv(
        rank=3,
        world_size=4,
        local_rank=1,
        master_addr="gpu07",
        master_port=hpctrain.slurm_master_port("123456"),
        source="slurm",
        port_candidates=tuple(hpctrain.slurm_master_port("123456", k) for k in range(4)),
        token="123456.0",
    )
    # The batch shell has SLURM_PROCID/SLURM_NTASKS too, but runs one process: no srun step, no DDP.
    monkeypatch.delenv("SLURM_STEP_ID")
    assert hpctrain.read_dist_env().source == "single"
    # torchrun's variables win (srun ... torchrun ...).
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    for k, v in {
        "RANK": "0",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "h",
        "MASTER_PORT": "1234",
    }.items():
        monkeypatch.setenv(k, v)
    assert hpctrain.read_dist_env() == hpctrain.DistEnv(0, 2, 0, "h", 1234, "torchrun")


def test_ports_from_job_ids_differ_and_avoid_the_ephemeral_range() -> None:
    ports = [hpctrain.slurm_master_port(str(j)) for j in range(1_000_000, 1_000_000 + 20_001)]
    assert len(set(ports)) == len(ports)  # ids 20,000 apart (and anything closer) never share a port
    every = [hpctrain.slurm_master_port(str(j), k) for j in (0, 19999, 20000, 987654321) for k in range(4)]
    assert all(1024 <= p < 32768 for p in every)  # Linux's ephemeral range is 32768-60999


def _ddp(args: tuple[str | Path, ...], port: int, world: int = 2) -> list[subprocess.Popen[str]]:
    procs = []
    for rank in range(world):
        env = job_env(
            RANK=str(rank),
            WORLD_SIZE=str(world),
            LOCAL_RANK=str(rank),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, str(MNIST), *map(str, args)],
                env=env,
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        )
    return procs


@pytest.mark.slow
def test_ddp_two_processes_gloo(mnist_dir: Path, tmp_path: Path) -> None:
    procs = _ddp(("--data-dir", mnist_dir, "--run-dir", tmp_path, "--epochs", "1"), free_port())
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outs)
    shas = final_sha(outs[0]) | final_sha(outs[1])
    assert set(shas) == {0, 1} and shas[0] == shas[1], "ranks ended with different weights"
    shards = {int(r): (first, h) for out in outs for r, first, h in SHARD_RE.findall(out)}
    assert set(shards) == {0, 1} and shards[0] != shards[1], "ranks trained on the same shard"
    assert "2 process(es) via torchrun" in outs[0] and "resumed" not in outs[0]
    assert metrics_epochs(tmp_path) == [1]  # rank 0 alone writes results
    assert (tmp_path / "model.pt").is_file()


@pytest.mark.slow
def test_ddp_signal_to_one_rank_stops_both(tmp_path: Path) -> None:
    args = (
        *"--dataset synthetic --limit-train 20000 --limit-test 500 --epochs 3 --batch-size 32".split(),
        "--run-dir",
        tmp_path,
    )
    procs = _ddp(args, free_port())
    _wait_for(procs[1], r"^rank 1 shard epoch 1")
    time.sleep(0.3)
    procs[1].send_signal(signal.SIGUSR2)  # as if only one node got the warning
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [75, 75], "\n".join(outs)
    assert "preempted at epoch 1, checkpoint written (SIGUSR2)" in outs[0]
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and ckpt["epoch"] == 0 and ckpt["step"] % hpctrain.STOP_SYNC_EVERY == 0
    # Both ranks' RNG states are saved, and they differ (each rank draws its own augmentation).
    assert len(ckpt["rng"]) == 2 and not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])
