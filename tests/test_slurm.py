"""The sbatch scripts in slurm/ on a real throwaway Slurm on this machine (tests/slurm_cluster.py): two
slurmd "nodes" on 127.0.0.1 where slurmd allows it (the two-node tests skip otherwise), else one.

Without Slurm (packages missing, not root, daemons failing) the cluster tests skip with the reason;
.ci/install-slurm installs it. The dry run of the multi-node launch needs no Slurm and always runs.
Jobs are polled with `scontrol show job` (no accounting needed) and the status lines the scripts write.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from speakerid.data.index import load_index
from speakerid.data.lists import read_train_list
from speakerid.data.pack import pack
from speakerid.data.plan import PackConfig, make_plan
from tests.conftest import REPO
from tests.slurm_cluster import SlurmCluster, SlurmUnavailable

SLURM = REPO / "slurm"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED"}
TINY = ["batch_size=4", "max_frames=20", "model.options.n_out=32", "train.mixed_precision=no"]


# ------------------------------------------------------------------------------------------------ helpers


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two slurmd "nodes" on this machine where slurmd allows it, else one."""
    try:
        started = SlurmCluster.start(tmp_path_factory.mktemp("slurm"), nodes=2)
    except SlurmUnavailable as two_nodes:
        try:
            started = SlurmCluster.start(tmp_path_factory.mktemp("slurm"), nodes=1)
        except SlurmUnavailable as reason:
            pytest.skip(f"no Slurm: {reason}")
        started.two_node_failure = str(two_nodes)
    yield started
    started.stop()


def need_nodes(cluster: SlurmCluster, n: int) -> None:
    if len(cluster.nodes) < n:
        pytest.skip(f"the test cluster has {len(cluster.nodes)} node(s): {getattr(cluster, 'two_node_failure', '')}")


@pytest.fixture(scope="module")
def train_shards(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("slurm_train") / "shards"
    pack(make_plan(read_train_list(corpus.train_list), corpus.root, PackConfig(chunk_size=2, max_utts=6)), corpus.root, out)
    return out


def job_env(cluster: SlurmCluster, **variables) -> dict:
    """The submitter's environment: this venv first on PATH (accelerate, python), as a user who activated it."""
    env = dict(cluster.env)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(PYTHON=sys.executable, COLUMNS="200", REPO=str(REPO), **{k: str(v) for k, v in variables.items()})
    return env


def sbatch(cluster: SlurmCluster, script: str, *options: str, cwd: Path, **variables) -> str:
    result = cluster.run("sbatch", "--parsable", "--time=10", *options, str(SLURM / script), cwd=cwd,
                         env=job_env(cluster, **variables))
    return result.stdout.strip().split(";")[0]


def wait_for(cluster: SlurmCluster, job_id: str, timeout: float, *, log: Path | None = None,
             restarts: int = 0) -> list[dict]:
    """Poll until every task of the job is finished (after `restarts` requeues); returns their records."""
    deadline = time.monotonic() + timeout
    while True:
        records = cluster.jobs(job_id)
        if records and all(r.get("JobState") in TERMINAL for r in records) and \
                all(int(r.get("Restarts", 0)) >= restarts for r in records):
            return records
        if time.monotonic() > deadline:
            cluster.run("scancel", job_id, check=False)
            raise AssertionError(f"job {job_id} not finished after {timeout:.0f} s: {records}\n"
                                 f"{read(log)[-3000:] if log else ''}\n{cluster.logs()}")
        time.sleep(0.5)


def read(path: Path | None) -> str:
    try:
        return path.read_text(errors="replace") if path else ""
    except FileNotFoundError:
        return ""


def assert_completed(records: list[dict], log: str = "") -> None:
    for r in records:
        assert (r.get("JobState"), r.get("ExitCode")) == ("COMPLETED", "0:0"), f"{r.get('JobId')}: {r}\n{log[-3000:]}"


# ------------------------------------------------------------------------------------------------ dry run (no Slurm)


def dry_run(tmp_path: Path, scontrol_works: bool, **variables) -> list[list[str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}
    if not scontrol_works:  # the script falls back to its own host-list expansion
        fake = tmp_path / "bin"
        fake.mkdir(exist_ok=True)
        (fake / "scontrol").write_text("#!/bin/sh\nexit 1\n")
        (fake / "scontrol").chmod(0o755)
        env["PATH"] = f"{fake}{os.pathsep}{env['PATH']}"
    env.update(DRY_RUN="1", REPO=str(REPO), **variables)
    result = subprocess.run(["bash", str(SLURM / "train_multinode.sbatch")], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    commands = []
    for line in result.stdout.splitlines():
        node, _, command = line.partition(": cd ")
        words = shlex.split(command)
        assert words[1] == "&&", line
        commands.append([node, *words[2:]])
    return commands


def option(words: list[str], name: str) -> str:
    return words[words.index(name) + 1]


@pytest.mark.parametrize("scontrol_works", [True, False], ids=["scontrol", "fallback-hostlist"])
def test_dry_run_prints_one_accelerate_launch_per_node(tmp_path, scontrol_works):
    from accelerate.commands.launch import launch_command_parser

    commands = dry_run(tmp_path, scontrol_works, SLURM_JOB_NODELIST="gpu-a[07-08]", SLURM_NNODES="2", SLURM_JOB_ID="4242",
                       GPUS_PER_NODE="4", CONFIG="configs/demo.yaml", TRAIN_ARGS="train.run_dir=runs/x batch_size=200")
    assert [c[0] for c in commands] == ["node 0 (gpu-a07)", "node 1 (gpu-a08)"]
    for rank, (_, *words) in enumerate(commands):
        assert words[:2] == ["accelerate", "launch"] and "--multi_gpu" in words
        assert option(words, "--num_machines") == "2"
        assert option(words, "--machine_rank") == str(rank)
        assert option(words, "--main_process_ip") == "gpu-a07"
        assert option(words, "--main_process_port") == str(20000 + 4242 % 20000)
        assert option(words, "--num_processes") == "8"
        script = words.index("train")
        assert words[script + 1:] == ["--config", "configs/demo.yaml", "train.run_dir=runs/x", "batch_size=200"]
        parsed = launch_command_parser().parse_args(words[2:])  # the options exist in this accelerate
        assert (parsed.num_machines, parsed.machine_rank, parsed.training_script) == (2, rank, "train")


def test_dry_run_without_gpus_falls_back_to_cpu_processes(tmp_path):
    commands = dry_run(tmp_path, False, SLURM_JOB_NODELIST="cpu1,cpu[3,5]", SLURM_NNODES="3", GPUS_PER_NODE="0",
                       CPU_PROCS_PER_NODE="2")
    assert [c[0] for c in commands] == ["node 0 (cpu1)", "node 1 (cpu3)", "node 2 (cpu5)"]
    for rank, (_, *words) in enumerate(commands):
        assert words[:3] == ["ACCELERATE_USE_CPU=true", "accelerate", "launch"]
        assert (option(words, "--num_processes"), option(words, "--machine_rank"), option(words, "--main_process_ip")) \
            == ("6", str(rank), "cpu1")


# ------------------------------------------------------------------------------------------------ on the cluster


def test_shardify_array_and_merge_equal_a_single_process_pack(cluster, corpus, tmp_path):
    reference = tmp_path / "reference"
    pack(make_plan(read_train_list(corpus.train_list), corpus.root, PackConfig(chunk_size=2, max_utts=6)),
         corpus.root, reference)
    out = tmp_path / "parts"
    result = cluster.run("bash", str(SLURM / "shardify_array.sbatch"), "--cpus-per-task=1", "--time=10", cwd=tmp_path,
                         env=job_env(cluster, PARTS=3, LIST=corpus.train_list, ROOT=corpus.root, OUT=out,
                                     PACK_ARGS="--chunk-size 2 --max-utts 6"))
    ids = dict(re.findall(r"(ARRAY_JOB_ID|MERGE_JOB_ID)=(\d+)", result.stdout))
    assert set(ids) == {"ARRAY_JOB_ID", "MERGE_JOB_ID"}, result.stdout + result.stderr
    merge_log = tmp_path / f"shardify-merge-{ids['MERGE_JOB_ID']}.out"
    tasks = wait_for(cluster, ids["ARRAY_JOB_ID"], 120)
    logs = "".join(read(p) for p in sorted(tmp_path.glob("shardify-*_*.out")))
    assert len(tasks) == 3, tasks
    assert_completed(tasks, logs)
    assert sorted(re.findall(r"--part (\d) --parts 3", logs)) == ["0", "1", "2"]
    assert_completed(wait_for(cluster, ids["MERGE_JOB_ID"], 60, log=merge_log), read(merge_log))
    assert "merged 12 shards" in read(merge_log)
    assert load_index(out) == load_index(reference)
    for shard in load_index(reference)["shards"]:
        assert (out / shard["name"]).read_bytes() == (reference / shard["name"]).read_bytes()


def train_job(cluster: SlurmCluster, shards: Path, work: Path, *train_args: str, nodes: int = 1, **variables) -> tuple[str, Path]:
    job = sbatch(cluster, "train_multinode.sbatch", f"--nodes={nodes}", "--gpus-per-node=0",
                 f"--cpus-per-task={cluster.cpus}", "--output=train-%j.out", cwd=work, STATUS_DIR=work / "status",
                 TRAIN_ARGS=" ".join([f"data.train_shards={shards}", f"train.run_dir={work / 'run'}", *TINY, *train_args]),
                 **variables)
    return job, work / f"train-{job}.out"


@pytest.fixture(scope="module")
def trained_run(cluster, train_shards, tmp_path_factory):
    """One epoch of a tiny model, trained through train_multinode.sbatch on one node."""
    work = tmp_path_factory.mktemp("slurm_trained")
    job, log = train_job(cluster, train_shards, work, "data.workers=0", "max_epoch=1")
    return work, job, log, wait_for(cluster, job, 120, log=log)


def check_trained(work: Path, job: str, log: Path, records: list[dict]) -> str:
    text = read(log)
    assert_completed(records, text)
    assert (work / "status" / f"{job}.status").read_text() == "restart=0 rc=0 signal=0 action=done\n", text[-3000:]
    assert "done: epoch 1" in text
    checkpoints = sorted((work / "run" / "checkpoints").glob("step-*/progress.json"))
    assert checkpoints, text[-3000:]
    assert json.loads(checkpoints[-1].read_text())["epoch"] == 1
    return text


def test_training_job_runs_and_checkpoints(trained_run):
    text = check_trained(*trained_run)
    assert "node 0 (" in text and "--num_machines 1 --machine_rank 0" in text


def test_training_job_on_two_nodes_runs_one_launch_per_node(cluster, train_shards, tmp_path):
    need_nodes(cluster, 2)
    job, log = train_job(cluster, train_shards, tmp_path, "data.workers=0", "max_epoch=1", nodes=2)
    text = check_trained(tmp_path, job, log, wait_for(cluster, job, 120, log=log))
    # each node's own line: its rank, and the first node's address (its name does not resolve: NodeAddr)
    for rank, name in enumerate(cluster.nodes):
        assert re.search(rf"node {rank} \({name}\) runs: ACCELERATE_USE_CPU=true accelerate launch --multi_gpu "
                         rf"--num_machines 2 --machine_rank {rank} --main_process_ip 127\.0\.0\.1 .*--num_processes 2 train", text), text[-3000:]
    assert text.count("done: epoch 1") == 2  # one line per training process


@pytest.mark.parametrize("nodes, processes", [
    pytest.param(1, 1, id="1node-1proc"),
    pytest.param(1, 2, id="1node-2procs"),
    pytest.param(2, 1, id="2nodes-1proc"),
])
def test_usr1_checkpoints_exits_0_requeues_and_the_next_run_resumes(cluster, train_shards, tmp_path, nodes, processes):
    need_nodes(cluster, nodes)
    job, log = train_job(cluster, train_shards, tmp_path, "data.workers=1", "max_epoch=1000", "train.max_steps=110",
                         "train.log_every=1", nodes=nodes, CPU_PROCS_PER_NODE=processes,
                         RESEND_EVERY=5)  # a signal met while a process starts up is repeated soon
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 90
    while not read(metrics).strip():  # training has started (the DataLoader workers are up)
        assert time.monotonic() < deadline and cluster.job(job).get("JobState") in ("PENDING", "RUNNING"), \
            f"{cluster.job(job)}\n{read(log)[-3000:]}"
        time.sleep(0.2)
    cluster.run("scancel", "--batch", "--signal=USR1", job)  # what --signal=B:USR1@120 does near the time limit
    status_file = tmp_path / "status" / f"{job}.status"
    deadline = time.monotonic() + 90  # one CPU shared by every rank and loader worker of the job
    while not read(status_file):  # the first run has checkpointed and exited (and requeued the job)
        if time.monotonic() > deadline or cluster.job(job).get("JobState") in TERMINAL:
            cluster.run("scancel", job, check=False)
            raise AssertionError(f"the training did not checkpoint and exit within 90 s of SIGUSR1: {cluster.job(job)}\n"
                                 f"{read(log)[-3000:]}")
        time.sleep(0.5)
    records = wait_for(cluster, job, 90, log=log, restarts=1)
    text = read(log)
    assert_completed(records, text)
    assert records[0]["Restarts"] == "1"
    status = read(status_file).splitlines()
    assert status == ["restart=0 rc=0 signal=USR1 action=requeue", "restart=1 rc=0 signal=0 action=done"], text[-3000:]
    ranks = nodes * processes
    stopped = re.findall(r"stopped by signal; re-run the same command to resume: epoch \d+, step (\d+)", text)
    resumed = re.search(r"resuming from (\S+)/step-(\d+) ", text)
    assert len(stopped) == ranks and resumed, text[-3000:]
    assert {int(step) for step in stopped} == {int(resumed.group(2))}, text[-3000:]  # every rank stopped there
    assert int(resumed.group(2)) < 110
    assert text.index("stopped by signal") < text.index("resuming from") < text.index("done: epoch")
    assert re.findall(r"done: epoch \d+, step (\d+)", text) == ["110"] * ranks  # 110: not at an epoch end
    if nodes == 1:  # (two nodes: torch's agents log a harmless exit-barrier error when the first one leaves)
        assert "Traceback" not in text, text[-3000:]


def test_evaluate_job_scores_the_trained_checkpoint(cluster, trained_run, corpus):
    if not (REPO / "evaluate" / "__main__.py").exists():
        pytest.skip("evaluate/__main__.py does not exist yet (python -m evaluate is being written)")
    work, _, train_log, records = trained_run
    assert_completed(records, read(train_log))
    job = sbatch(cluster, "evaluate.sbatch", "--gpus-per-node=0", "--cpus-per-task=1", "--output=eval-%j.out", cwd=work,
                 CKPT=work / "run", TRIALS=corpus.trials, AUDIO=corpus.root, OUT=work / "eval",
                 EVAL_ARGS="--eval-frames 100 --num-eval 2")  # crops: whole utterances take ~10x longer on CPU
    log = work / f"eval-{job}.out"
    assert_completed(wait_for(cluster, job, 120, log=log), read(log))
    text = read(log)
    assert "--eval-frames 100 --num-eval 2" in text and "EER" in text, text
    assert (work / "eval" / "summary.json").exists(), text
