"""Shared fixtures: a tiny locally built model and tiny data files, so every test runs offline
on a CPU in seconds. Everything runs with the Hugging Face hub switched off.

Two lanes: `bash test.sh -m "not slow"` runs the unit tests; `bash test.sh` runs
everything, as CI does. A test is `slow` when it, or a fixture it uses, starts a process (a stage
script, a tool, `accelerate launch`): marked here, from the source, so no test can forget it.
Tests that train in this process carry @pytest.mark.slow themselves."""

import glob
import inspect
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
# test.sh runs the tests in 2 pytest-xdist workers: each worker, and every process it starts,
# gets an equal share of the cores, so that their torch threads do not fight over them
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // WORKERS)))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return str(path)


def toy_conversations(n, seed=0):
    """`add_k` tasks in English and Chinese: enough structure for a tiny model to learn a bit."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        k = rng.randint(1, 30)
        prompt = rng.choice([f"Write a function add_{k}(x) that returns x plus {k}.",
                             f"写一个函数 add_{k}(x)，返回 x 加 {k}。"])
        answer = f"```python\ndef add_{k}(x):\n    return x + {k}\n```"
        rows.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]})
    return rows


# a call that starts a process: subprocess itself, or a helper of conftest or of a test file that
# does (run_snippet, help_text: transformers' ~6 s of imports a process). Not the sandbox attack
# tests' evaluate_elsewhere: an interpreter without torch, for tests of the sandbox's verdicts
LAUNCHES_A_PROCESS = re.compile(r"\b(run_script|kill_after_first_checkpoint|subprocess\.\w+|Popen|launch|run_evaluate|run_snippet|help_text)\(")


def starts_a_process(function):
    try:
        return bool(LAUNCHES_A_PROCESS.search(inspect.getsource(function)))
    except (OSError, TypeError):  # no source (a builtin fixture)
        return False


# test.sh runs the tests in 2 pytest-xdist workers, a file at a time (--dist loadfile), so that a
# file's fixtures are built once; files that share an expensive session fixture share a worker
# (two_process_runs: about a minute of 2-process training)
SAME_WORKER = {"tests/test_multinode.py": "tests/test_distributed.py"}
# the files that take longest, first (test.sh keeps this order: --no-loadscope-reorder), so that no
# worker is left with a long file at the end
LONGEST_FIRST = ["test_distributed.py", "test_multinode.py", "test_ppo.py", "test_pipeline.py", "test_model_families.py",
                 "test_sandbox_isolation.py", "test_sandbox_attacks.py"]


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """--dist loadfile, with the files of SAME_WORKER sent to one worker as one unit."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class LoadFileGroups(LoadFileScheduling):
        def _split_scope(self, nodeid):
            file = super()._split_scope(nodeid)
            return SAME_WORKER.get(file, file)

    return LoadFileGroups(config, log)


def pytest_collection_modifyitems(config, items):
    """Mark `slow` every test that starts a process itself or through one of its fixtures; the
    longest files first."""
    for item in items:
        fixtures = getattr(item, "_fixtureinfo", None)
        defs = [d for ds in (fixtures.name2fixturedefs.values() if fixtures else []) for d in ds]
        if starts_a_process(getattr(item, "function", None)) or any(starts_a_process(d.func) for d in defs):
            item.add_marker(pytest.mark.slow)
    order = {file: i for i, file in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: order.get(os.path.basename(str(item.fspath)), len(order)))


def run_script(script, *args, cwd=ROOT, timeout=600):
    """Run a project script as a user would; returns the CompletedProcess (output captured)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def kill_after_first_checkpoint(script, args, folder):
    """Start a stage, SIGKILL it as soon as a complete checkpoint exists; returns that checkpoint."""
    from rlhf.checkpoints import CHECKPOINT_MARKER

    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, script), *args], cwd=ROOT,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline and not glob.glob(f"{folder}/checkpoint-*/{CHECKPOINT_MARKER}"):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = glob.glob(f"{folder}/checkpoint-*/{CHECKPOINT_MARKER}")
    assert done, "no checkpoint before the end of the run"
    return os.path.dirname(done[0])


@pytest.fixture
def run_in_process(monkeypatch, capsys):
    """run(script, *args): a stage script or a tool of scripts/ run in this process the way
    `python <script> <args>` runs it (run_stage: a UserError is one `error:` line on stderr and exit code 2), without the
    interpreter start-up and its ~6 s of imports; for the errors a stage reports before it trains,
    and for whole runs whose test needs no process of its own (tests/test_ppo.py). Every run
    starts from the settings the test had; they are restored afterwards. Returns a
    CompletedProcess (output from capsys)."""
    return in_process_runner(monkeypatch, capsys.readouterr)


def in_process_runner(monkeypatch, readouterr):
    """run_in_process's `run`, its settings restored by `monkeypatch` and its output read by
    `readouterr()` (capsys's, or one of a fixture wider than a test: tests/test_ppo_wiring.py)."""
    import importlib
    from subprocess import CompletedProcess

    import config as C
    from rlhf.common import run_stage
    from rlhf.settings import settings

    saved = settings()
    for name, value in saved.items():
        monkeypatch.setattr(C, name, value)
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", "")
    monkeypatch.chdir(ROOT)

    def run(script, *args):
        from accelerate.state import AcceleratorState

        for name, value in saved.items():
            setattr(C, name, value)
        AcceleratorState._reset_state(reset_partial_state=True)  # each run chooses its own precision, as a process would
        main = importlib.import_module(script.removesuffix(".py").replace("/", ".")).main  # scripts/x.py: scripts.x
        monkeypatch.setattr(sys, "argv", [script, *args])
        readouterr()
        try:
            run_stage(main)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        out = readouterr()
        return CompletedProcess([script, *args], code, out.out, out.err)

    return run


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("toy_data")
    return {
        "sft_train": write_jsonl(folder / "sft_train.jsonl", toy_conversations(48, seed=1)),
        "sft_eval": write_jsonl(folder / "sft_eval.jsonl", toy_conversations(8, seed=2)),
        "folder": folder,
    }


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory, toy_data):
    """A ~50k-parameter Qwen2 with a 400-token BPE vocabulary, built like the embedded default."""
    import types

    import config as C
    from rlhf.base_model import build_base_model

    out = tmp_path_factory.mktemp("tiny") / "base"
    tiny = types.SimpleNamespace(BASE_VOCAB_SIZE=400, BASE_HIDDEN=32, BASE_LAYERS=2, BASE_HEADS=4, BASE_KV_HEADS=2,
                                 BASE_INTERMEDIATE=64, BASE_MAX_POSITIONS=256, SEED=C.SEED,
                                 GEN_MAX_NEW_TOKENS=C.GEN_MAX_NEW_TOKENS)
    build_base_model(str(out), tiny, data_files=[toy_data["sft_train"]], stdlib_bytes=100_000)
    return str(out)


def toy_tasks(n):
    """n code tasks with a unit test and a reference: task k asks for add_k(x) = x + k."""
    return [{"task_id": f"t{k}", "prompt": f"Write add_{k}(x) returning x plus {k}.", "entry_point": f"add_{k}",
             "tests": [{"call": f"add_{k}(1)", "expected": str(k + 1)}], "solution": f"def add_{k}(x):\n    return x + {k}"}
            for k in range(1, n + 1)]


def toy_preference_pairs(n, seed=0):
    """`add_k` tasks as preference pairs: chosen adds k, rejected subtracts it (an easy toy
    preference a tiny reward model can learn in a few steps)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        k = rng.randint(1, 30)
        prompt = rng.choice([f"Write a function add_{k}(x) that returns x plus {k}.",
                             f"写一个函数 add_{k}(x)，返回 x 加 {k}。"])
        rows.append({
            "prompt": [{"role": "user", "content": prompt}],
            "chosen": [{"role": "assistant", "content": f"```python\ndef add_{k}(x):\n    return x + {k}\n```"}],
            "rejected": [{"role": "assistant", "content": f"```python\ndef add_{k}(x):\n    return x - {k}\n```"}],
            "task_id": f"toy/{i}", "family": "add",  # extra fields, as in the bundled data
        })
    return rows


@pytest.fixture(scope="session")
def toy_pairs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("toy_pairs")
    return {
        "rm_train": write_jsonl(folder / "rm_train.jsonl", toy_preference_pairs(48, seed=3)),
        "rm_eval": write_jsonl(folder / "rm_eval.jsonl", toy_preference_pairs(16, seed=4)),
        # tasks with tests and a reference: what the RM stage samples its on-policy pairs on
        "tasks": write_jsonl(folder / "tasks.jsonl", toy_tasks(3)),
        "folder": folder,
    }


@pytest.fixture(scope="session")
def tiny_sft(tiny_base, toy_data, tmp_path_factory):
    """./sft_model of the tiny base, made by running train_sft.py once (a finished stage output)."""
    out = tmp_path_factory.mktemp("tiny_sft")
    proc = run_script("train_sft.py", f"--MODEL_NAME={tiny_base}", f"--SFT_DIR={out / 'sft_model'}",
                      f"--RUNS_DIR={out / 'runs'}", f"--SFT_TRAIN_FILE={toy_data['sft_train']}",
                      f"--SFT_EVAL_FILE={toy_data['sft_eval']}", "--EPOCHS=1", "--BATCH_SIZE=8",
                      "--SFT_EVAL_PASS_AT_1=false", "--REPORT_TO=none")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return str(out / "sft_model")


# ---------------------------------------------------------------------------------------------
# Several processes, several "machines" (tests/test_distributed.py, tests/test_multinode.py)
# ---------------------------------------------------------------------------------------------
CPU_CONFIG = os.path.join(ROOT, "accelerate_configs", "cpu.yaml")
LAUNCH_TIMEOUT = 300  # seconds; a rank waiting forever for another fails the test here


def free_port():
    """A free TCP port: other runs on this machine may hold accelerate's default 29500."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_pids(pid):
    """Processes whose parent is pid (read from /proc: torchrun starts each worker in a session
    of its own, so killing the launcher's process group leaves the workers running)."""
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:  # the process ended while we looked
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                children.append(int(entry))
    return children


def kill_launch(proc):
    """End an `accelerate launch` and its workers for good (SIGKILL), whatever state they are in."""
    for pid in child_pids(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def start_launch(log_path, script, *args, config=CPU_CONFIG, processes=2, machines=1, machine_rank=0, port=None,
                 launch_options=()):
    """Start `accelerate launch --config_file CONFIG --num_processes N [--num_machines M --machine_rank R
    --main_process_ip 127.0.0.1] --main_process_port P script args` in a session of its own, its
    output (stdout and stderr together) going to log_path. N counts the processes of all machines,
    as on a real cluster; every machine is given the same port."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, "--num_processes", str(processes),
           "--main_process_port", str(port or free_port())]
    if machines > 1:
        cmd += ["--num_machines", str(machines), "--machine_rank", str(machine_rank), "--main_process_ip", "127.0.0.1"]
    cmd += [*launch_options, os.path.join(ROOT, script), *args]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    with open(log_path, "w") as log:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_launches(procs, logs, timeout=LAUNCH_TIMEOUT, what="the run"):
    """Wait for every launch to end (all within timeout seconds); a launch still running then is
    killed with its workers and the test fails. Returns each launch's output."""
    import pytest

    deadline = time.time() + timeout
    try:
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
        for proc in procs:
            kill_launch(proc)
        pytest.fail(f"{what} did not finish in {timeout} s (a rank waiting for another?)\n"
                    + "\n".join(open(log).read()[-3000:] for log in logs))
    return [open(log).read() for log in logs]


def launch(script, *args, processes=2, timeout=LAUNCH_TIMEOUT, config=CPU_CONFIG, launch_options=(), log_dir=None):
    """One machine, `processes` processes (cpu.yaml: torchrun, gloo); asserts it succeeded and
    returns its output."""
    import tempfile

    log = os.path.join(log_dir or tempfile.mkdtemp(), f"{os.path.basename(script)}.{free_port()}.log")
    proc = start_launch(log, script, *args, config=config, processes=processes, launch_options=launch_options)
    (out,) = wait_launches([proc], [log], timeout, f"{script} on {processes} processes")
    assert proc.returncode == 0, out[-6000:]
    return out


def launch_machines(script, *args, machines=2, processes_per_machine=1, timeout=LAUNCH_TIMEOUT, log_dir=None):
    """`machines` launches on this host, as on `machines` machines: the same command on each but
    --machine_rank, all pointing at machine 0's address and port. Asserts every one succeeded;
    returns their outputs, machine 0's first."""
    import tempfile

    log_dir = log_dir or tempfile.mkdtemp()
    port = free_port()
    logs = [os.path.join(log_dir, f"{os.path.basename(script)}.{port}.machine{r}.log") for r in range(machines)]
    procs = [start_launch(logs[r], script, *args, processes=machines * processes_per_machine, machines=machines,
                          machine_rank=r, port=port) for r in range(machines)]
    outs = wait_launches(procs, logs, timeout, f"{script} on {machines} machines")
    for r, (proc, out) in enumerate(zip(procs, outs)):
        assert proc.returncode == 0, f"machine {r}:\n" + out[-6000:]
    return outs


def sft_losses(folder):
    history = json.load(open(os.path.join(folder, "rlhf_stage.json")))["metrics"]["log_history"]
    return [h["loss"] for h in history if "loss" in h]


def ppo_history(folder):
    return json.load(open(os.path.join(folder, "rlhf_stage.json")))["metrics"]["history"]


def same_length_conversations(model_dir, n):
    """n toy conversations that all have the same number of tokens. SFT batches group examples
    by length (transformers' LengthGroupedSampler), and its groups depend on the per-device batch
    size, so 1 x 4 and 2 x 2 put different examples together; at equal lengths both keep the
    sampler's random order and the global batches hold the same examples."""
    from rlhf.common import load_tokenizer

    tok = load_tokenizer(model_dir)
    rows = toy_conversations(20 * n, seed=11)
    lengths = [len(tok.apply_chat_template(r["messages"], tokenize=True)["input_ids"]) for r in rows]
    common = max(set(lengths), key=lengths.count)
    rows = [r for r, length in zip(rows, lengths) if length == common]
    assert len(rows) >= n, f"only {len(rows)} toy conversations of {common} tokens"
    return rows[:n]


@pytest.fixture(scope="session")
def two_process_runs(tiny_base, tmp_path_factory):
    """SFT on 1 process (batch 4) and on 2 (batch 2 each), then RM and PPO on 2 processes from
    the 2-process outputs. 22 SFT examples and 21 RM pairs do not divide into the global batch
    of 4: the last batch of a rank would be missing or short (with the step counts uneven, one
    rank would wait forever for the others), and PPO's prompts differ in length across ranks.
    Also returned: the settings used, so that other launches (several machines, FSDP2) can
    repeat a run and compare."""
    folder = tmp_path_factory.mktemp("dist")
    sft_train = write_jsonl(folder / "sft_train.jsonl", same_length_conversations(tiny_base, 22))
    sft_eval = write_jsonl(folder / "sft_eval.jsonl", toy_conversations(5, seed=12))
    sft_args = [f"--MODEL_NAME={tiny_base}", f"--SFT_TRAIN_FILE={sft_train}", f"--SFT_EVAL_FILE={sft_eval}",
                "--EPOCHS=1", "--LOG_EVERY=1", "--LR=1e-3", "--SFT_EVAL_PASS_AT_1=false", "--REPORT_TO=none"]
    one = folder / "one"
    proc = run_script("train_sft.py", *sft_args, "--BATCH_SIZE=4", f"--SFT_DIR={one}/sft", f"--RUNS_DIR={one}/runs")
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = folder / "two"
    logs = {"sft": launch("train_sft.py", *sft_args, "--BATCH_SIZE=2", f"--SFT_DIR={two}/sft", f"--RUNS_DIR={two}/runs",
                          log_dir=folder)}

    rm_train = write_jsonl(folder / "rm_train.jsonl", toy_preference_pairs(21, seed=13))
    rm_eval = write_jsonl(folder / "rm_eval.jsonl", toy_preference_pairs(7, seed=14))
    rm_tasks = write_jsonl(folder / "rm_tasks.jsonl", toy_tasks(2))  # on-policy pairs: rank 0 samples, both train on them
    logs["rm"] = launch("train_rm.py", f"--SFT_DIR={two}/sft", f"--RM_DIR={two}/rm", f"--RUNS_DIR={two}/runs",
                        f"--RM_TRAIN_FILE={rm_train}", f"--RM_EVAL_FILE={rm_eval}", "--RM_BATCH_SIZE=2",
                        f"--RM_ONPOLICY_PROMPTS_FILE={rm_tasks}", "--RM_ONPOLICY_SAMPLES=1", "--GEN_MAX_NEW_TOKENS=8",
                        "--RM_EPOCHS=1", "--LOG_EVERY=5", "--REPORT_TO=none", log_dir=folder)

    rng = random.Random(15)  # prompts of 1 to 12 sentences: each rank's batch has its own padded length
    prompts = [{"task_id": f"t{k}", "entry_point": f"add_{k}", "tests": [{"call": f"add_{k}(1)", "expected": str(k + 1)}],
                "prompt": [{"role": "user", "content": " ".join([f"Write add_{k}(x) returning x plus {k}."] * rng.randint(1, 12))}]}
               for k in range(1, 25)]
    prompts_file = write_jsonl(folder / "ppo.jsonl", prompts)
    tasks = write_jsonl(folder / "tasks.jsonl", [dict(r, prompt=r["prompt"][0]["content"]) for r in prompts[:3]])
    ppo_args = [f"--SFT_DIR={two}/sft", f"--RM_DIR={two}/rm", f"--PPO_PROMPTS_FILE={prompts_file}",
                f"--EVAL_TASKS_FILE={tasks}", "--MAX_LEN=256", "--PPO_STEPS=2", "--PPO_BATCH_SIZE=4",
                "--PPO_MINI_BATCH_SIZE=2", "--PPO_SAMPLES_PER_PROMPT=2", "--PPO_ADVANTAGE=gae",  # the critic path: harder for the engines
                "--PPO_RESPONSE_LEN=16", "--GEN_MAX_NEW_TOKENS=8",
                "--PPO_EVAL_EVERY=0", "--PPO_SAVE_EVERY=0", "--REPORT_TO=none"]  # evaluated once, at the end
    logs["ppo"] = launch("train_ppo.py", *ppo_args, f"--PPO_DIR={two}/ppo", f"--RUNS_DIR={two}/runs", log_dir=folder)
    return {"one": one, "two": two, "logs": logs, "folder": folder, "sft_args": sft_args, "ppo_args": ppo_args}


@pytest.fixture(scope="session")
def ppo_inputs(tiny_base, tmp_path_factory):
    """A tiny ./sft_model (the untrained tiny base), a ./rm_model from it, prompts with tests."""
    from rlhf.common import load_tokenizer
    from rlhf.handoff import save_stage_output
    from rlhf.reward import load_reward_model, save_reward_normalization
    from rlhf.settings import scalar_settings

    folder = tmp_path_factory.mktemp("ppo_inputs")
    sft, rm = str(folder / "sft_model"), str(folder / "rm_model")
    save_stage_output(sft, "sft", lambda tmp: shutil.copytree(tiny_base, tmp, dirs_exist_ok=True), {}, scalar_settings())
    model, tok = load_reward_model(sft), load_tokenizer(sft)

    def save_rm(tmp):
        save_reward_normalization(tmp, {"mean": 0.0, "std": 1.0}, model)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    save_stage_output(rm, "rm", save_rm, {}, scalar_settings())
    rows = [{"task_id": f"t{k}", "prompt": [{"role": "user", "content": f"Write add_{k}(x) returning x plus {k}."}],
             "entry_point": f"add_{k}", "tests": [{"call": f"add_{k}(1)", "expected": str(k + 1)}]} for k in range(1, 21)]
    prompts = write_jsonl(folder / "ppo.jsonl", rows)
    tasks = write_jsonl(folder / "tasks.jsonl", [dict(r, prompt=r["prompt"][0]["content"]) for r in rows[:4]])
    return {"sft": sft, "rm": rm, "prompts": prompts, "tasks": tasks, "folder": folder}


def expected_last_lrs(lr, steps, updates_per_step):
    """PPO's rate of each iteration's last update under linear decay to 0 over all updates."""
    n = steps * updates_per_step
    return [lr * (n - (s * updates_per_step - 1)) / n for s in range(1, steps + 1)]


def ppo_args(inp, out, *extra):
    """Overrides that run train_ppo.py on ppo_inputs `inp`, every output under `out`, in seconds."""
    return [f"--SFT_DIR={inp['sft']}", f"--RM_DIR={inp['rm']}", f"--PPO_DIR={out}/ppo_model", f"--RUNS_DIR={out}/runs",
            f"--PPO_PROMPTS_FILE={inp['prompts']}", f"--EVAL_TASKS_FILE={inp['tasks']}", "--MAX_LEN=128",
            "--PPO_BATCH_SIZE=8", "--PPO_MINI_BATCH_SIZE=4", "--PPO_RESPONSE_LEN=12", "--GEN_MAX_NEW_TOKENS=12",
            "--EVAL_SAMPLES=0", "--SEED_PROMPT_SAMPLES=0", "--REPORT_TO=none", *extra]  # both: tests/test_pipeline.py
