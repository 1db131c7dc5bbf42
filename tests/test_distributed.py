"""Several processes through torchrun, on this CPU with gloo: the same numbers as one process,
exact resume after a rank is killed, resume across rank counts, and one-line errors.

Every run here is ``tiny`` in fp32 for 20 steps (dropout on, as the preset has it: each
micro-batch's masks follow from its place in the step, not from the rank that runs it), with a
global batch of 1 x 4 sequences (two micro-batches per rank). The torchrun runs go through
``fault_runner.py none``, which is ``pocketlm`` with the tests' fixed matmul peak.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from cli_checks import assert_one_line_error, run_cli
from pocketlm.checkpoint import list_checkpoints
from pocketlm.distributed import Ranks, check_split
from pocketlm.errors import ConfigError
from pocketlm.metrics import METRICS_FILE

RUNNER = Path(__file__).with_name("fault_runner.py")
STEPS = 20


def settings(corpus: Path, **extra: object) -> list[str]:
    base = {"preset": "tiny", "data": corpus, "precision": "fp32", "device": "cpu", "no-compile": True,
            "batch-size": 1, "grad-accum": 4, "max-steps": STEPS, "warmup-steps": 2, "log-interval": 1,
            "eval-interval": 20, "eval-batches": 1, "save-interval": 5, "keep-checkpoints": 10, **extra}
    args: list[str] = []
    for name, value in base.items():
        args += [f"--{name}"] if value is True else [f"--{name}", str(value)]
    return args


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    cache = tmp_path_factory.mktemp("token-cache")
    return {**os.environ, "OMP_NUM_THREADS": "1", "POCKETLM_CACHE": str(cache), "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join([str(RUNNER.parent), os.environ.get("PYTHONPATH", "")])}


def torchrun_command(out_dir: Path, corpus: Path, *extra: str, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            str(RUNNER), "none", "0", "train", *settings(corpus), "--out-dir", str(out_dir), *extra]


def torchrun(out_dir: Path, corpus: Path, env: dict[str, str], *extra: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(torchrun_command(out_dir, corpus, *extra), env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def one_process(out_dir: Path, corpus: Path, env: dict[str, str], capsys) -> None:
    """The same run in this process (no torchrun: WORLD_SIZE unset). A resumed torchrun run sets
    its own thread count (one, torchrun's); the rest of the suite gets this process's back."""
    import torch

    old, threads = os.environ.get("POCKETLM_CACHE"), torch.get_num_threads()
    os.environ["POCKETLM_CACHE"] = env["POCKETLM_CACHE"]
    try:
        code, _, err = run_cli(capsys, "train", *settings(corpus), "--out-dir", out_dir)
    finally:
        torch.set_num_threads(threads)
        if old is None:
            os.environ.pop("POCKETLM_CACHE")
        else:
            os.environ["POCKETLM_CACHE"] = old
    assert code == 0, err


def step_losses(out_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out_dir / METRICS_FILE).read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r.get("event") == "step"}


def final_weights(out_dir: Path) -> bytes:
    return (list_checkpoints(out_dir)[-1] / "model.safetensors").read_bytes()


def assert_close_losses(a: dict[int, float], b: dict[int, float], steps: range, rel: float = 1e-5) -> None:
    assert set(steps) <= set(a) and set(steps) <= set(b)
    for step in steps:
        assert abs(a[step] - b[step]) <= rel * abs(a[step]), (step, a[step], b[step])


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, corpus_file: Path, env: dict[str, str]) -> dict[str, Path]:
    """The uninterrupted two-process DDP run (one process is run per test)."""
    root = tmp_path_factory.mktemp("runs")
    torchrun(root / "ddp", corpus_file, env)
    return {"ddp": root / "ddp"}


@pytest.mark.slow
def test_two_processes_give_one_process_losses_with_ddp_and_fsdp(runs, corpus_file, env, tmp_path, capsys):
    one_process(tmp_path / "one", corpus_file, env, capsys)
    single = step_losses(tmp_path / "one")
    assert_close_losses(single, step_losses(runs["ddp"]), range(1, STEPS + 1))
    # Rank 0 alone writes: one log, one checkpoint per save step, nothing else in the folder.
    assert [p.name for p in list_checkpoints(runs["ddp"])] == [f"step-{s:08d}" for s in range(5, STEPS + 1, 5)]
    assert (runs["ddp"] / METRICS_FILE).read_text().count('"event": "start"') == 1
    # A saved 1-process run resumes on 2 ranks sharded by FSDP (its steps 11-20 are FSDP's check
    # against one process), a saved 2-rank run on 1 process: the same losses as the uninterrupted
    # runs, within fp32 rounding.
    for source, target, extra in ((tmp_path / "one", tmp_path / "one-to-two", ("--fsdp",)),
                                  (runs["ddp"], tmp_path / "two-to-one", None)):
        (target / "checkpoints").mkdir(parents=True)
        shutil.copytree(list_checkpoints(source)[1], target / "checkpoints" / "step-00000010")
        shutil.copy(source / "config.json", target / "config.json")
        if extra is None:
            one_process(target, corpus_file, env, capsys)
        else:
            torchrun(target, corpus_file, env, *extra)
        assert min(step_losses(target)) == 11
        assert_close_losses(step_losses(source), step_losses(target), range(11, STEPS + 1))
    # The FSDP checkpoint is the same single-folder format, gathered whole: same names, shapes, dtypes.
    ours, sharded = load_file(list_checkpoints(tmp_path / "one")[-1] / "model.safetensors"), \
        load_file(list_checkpoints(tmp_path / "one-to-two")[-1] / "model.safetensors")
    assert {k: (v.shape, v.dtype) for k, v in ours.items()} == {k: (v.shape, v.dtype) for k, v in sharded.items()}


def descendants_with_rank(parent: int, rank: int) -> int | None:
    """The pid of the process below ``parent`` whose environment says RANK=``rank``."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


def launch_until(out_dir: Path, corpus: Path, env: dict[str, str], checkpoint_step: int, sig: int) -> tuple[int, str]:
    """Start the 2-rank run, wait for its checkpoint of ``checkpoint_step``, then send ``sig`` to
    rank 1 only; (torchrun's exit status, its output)."""
    proc = subprocess.Popen(torchrun_command(out_dir, corpus), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        target = out_dir / "checkpoints" / f"step-{checkpoint_step:08d}"
        deadline = time.monotonic() + 240
        while not target.is_dir() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be interrupted"
        rank1 = descendants_with_rank(proc.pid, 1)
        assert rank1 is not None
        os.kill(rank1, sig)
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, out


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_all_and_kill_9_resumes_bit_identical(runs, corpus_file, env, tmp_path):
    out = tmp_path / "run"
    # SIGTERM to rank 1 only: every rank stops at the same step boundary, rank 0 saves once.
    code, output = launch_until(out, corpus_file, env, 5, signal.SIGTERM)
    assert code != 0
    stopped = [int(line.split(" at step ")[1].split(";")[0]) for line in output.splitlines()
               if "pocketlm: interrupted by SIGTERM at step" in line]
    assert len(stopped) == 2 and stopped[0] == stopped[1] and stopped[0] < STEPS, output[-2000:]
    assert list_checkpoints(out)[-1].name == f"step-{stopped[0]:08d}"
    # The same command resumes; this time rank 1 dies by SIGKILL after the step-15 save.
    code, output = launch_until(out, corpus_file, env, 15, signal.SIGKILL)
    assert code != 0
    assert max(step_losses(out)) < STEPS
    # And once more: the run completes, with the uninterrupted run's weights, bit for bit.
    torchrun(out, corpus_file, env)
    assert final_weights(out) == final_weights(runs["ddp"])
    assert step_losses(out)[STEPS] == step_losses(runs["ddp"])[STEPS]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ranks_started_with_different_settings_stop_with_one_line(corpus_file, env, tmp_path):
    """What torchrun does, by hand, so that each rank can get its own command line."""
    port = str(free_port())
    procs = []
    for rank, lr in ((0, "3e-4"), (1, "1e-3")):
        rank_env = {**env, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        procs.append(subprocess.Popen([sys.executable, str(RUNNER), "none", "0", "train", *settings(corpus_file),
                                       "--out-dir", str(tmp_path / "run"), "--lr", lr],
                                      env=rank_env, stderr=subprocess.PIPE, text=True))
    results = [(p.wait(timeout=240), p.stderr.read()) for p in procs]
    line = assert_one_line_error(*results[1], "rank 1 differs from rank 0", "lr", "same command")
    assert "0.001" in line and "0.0003" in line
    assert_one_line_error(*results[0], "rank(s) 1 differ from rank 0")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_fsdp_in_one_process_is_a_one_line_error(corpus_file, tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", *settings(corpus_file), "--out-dir", tmp_path / "run", "--fsdp")
    assert_one_line_error(code, err, "--fsdp", "torchrun --nproc-per-node")


@pytest.mark.parametrize("flags, needle", [(("--optimizer", "muon"), "Muon"), (("--ema-decay", "0.9"), "average"),
                                           (("--low-memory",), "bf16 gradients")])
def test_fsdp_refuses_what_it_cannot_shard_in_one_line(corpus_file, tmp_path, capsys, flags, needle):
    code, _, err = run_cli(capsys, "train", *settings(corpus_file), "--out-dir", tmp_path / "run", "--fsdp", *flags)
    assert_one_line_error(code, err, "--fsdp cannot be combined", needle)


@pytest.mark.parametrize("accum, batch, world, hint", [(4, 4, 3, "no split of 16 sequences"),
                                                        (3, 4, 2, "--batch-size 3 --grad-accum 4")])
def test_a_step_that_cannot_be_split_across_ranks_is_a_one_line_error(accum, batch, world, hint):
    with pytest.raises(ConfigError, match="cannot be split evenly across") as err:
        check_split(accum, batch, world)
    assert hint in str(err.value) and "\n" not in str(err.value)
    check_split(accum * world, batch, world)  # a multiple of the ranks splits


def test_each_rank_takes_every_nth_micro_batch_of_a_step():
    group = list("abcdefg")
    shares = [Ranks(rank, 3).share(group) for rank in range(3)]
    assert shares[0] == [(0, "a"), (3, "d"), (6, "g")] and shares[2] == [(2, "c"), (5, "f")]
    assert sorted(i for share in shares for i, _ in share) == list(range(len(group)))
    assert Ranks(2, 3).share(group[:2]) == []  # an epoch's short last step: this rank runs a filler


@pytest.mark.parametrize("env_vars, needle", [({"RANK": "0"}, "WORLD_SIZE, LOCAL_RANK not set"),
                                              ({"RANK": "x", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "whole numbers"),
                                              ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "0 <= RANK")])
def test_a_broken_torchrun_environment_is_a_one_line_error(env_vars, needle):
    with pytest.raises(ConfigError, match=needle):
        Ranks.from_env(env_vars)
    assert Ranks.from_env({}) == Ranks()
    assert Ranks.from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == Ranks(1, 2, 1)


def test_optimizer_state_by_parameter_name_round_trips_to_torchs_numbered_layout():
    """The checkpoint keeps torch.optim's numbered layout; the state-dict helpers name parameters.
    The two translations are each other's inverse, over several groups."""
    import torch

    from pocketlm.optim import decay_groups
    from pocketlm.sharded_state import by_index, by_name, parameter_names

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    optimizer = torch.optim.AdamW(decay_groups(model, 0.1), lr=1e-3)
    model(torch.randn(5, 3)).sum().backward()
    optimizer.step()
    names = parameter_names(model, optimizer)
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    numbered = optimizer.state_dict()
    named = by_name(numbered, names)
    assert set(named["state"]) == set(names) and named["param_groups"][0]["params"][0] in names
    back = by_index(named, names)
    assert back["param_groups"] == numbered["param_groups"]
    assert set(back["state"]) == set(numbered["state"])
    for i, state in numbered["state"].items():
        assert all(torch.equal(state[k], back["state"][i][k]) for k in state)
