"""The real SGLang server on a CPU, for the ``real_sglang`` test tier (FIELD-NOTES 2c).

Three pieces, each usable on its own (``docs/sglang.md``, "Testing against a real SGLang without
a GPU"):
- :func:`ensure_venv`: SGLang in a virtualenv of its own, OUTSIDE the repo, keyed by the
  release (``$SAPO_SGLANG_VENV_ROOT``, default ``~/.cache/sapo_megatron``, then
  ``sglang-<version>``), built once per machine and reused. SGLang pins its own torch (a CUDA
  build, which runs on CPU), so it never goes into the project's environment. A failed install
  raises :class:`InstallError` with pip's last line: the tier fails, it never skips.
- :func:`make_tiny_model`: a tiny random Qwen3-MoE and a BPE tokenizer trained offline, in HF
  format, made at test time (no download).
- :class:`RealServer`: one ``sglang.launch_server`` on loopback with the kernel stand-in first on
  its ``PYTHONPATH``; waits for ``/health``; keeps the last lines of its log (bounded); stops by
  process group (the scheduler and detokenizer are children), also when the test fails.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

SGLANG_VERSION = os.environ.get("SAPO_SGLANG_VERSION", "0.5.23")
STANDIN = Path(__file__).resolve().parent / "kernel_standin"
REPO = Path(__file__).resolve().parents[2]  # sapo_sglang (the delta loader) and tests/ import from here
DELTA_LOADER = "sapo_sglang.delta_loader.apply_delta"
# The delta sync's fault injection (test_delta_real.py): our loader after corrupting the delta once.
CORRUPTING_LOADER = "tests.real_sglang.delta_fault.apply_corrupted_once"
READY = ".sapo_ready"
INSTALL_TIMEOUT_S = 1200
LOG_LINES = 400  # the tail kept in memory for error messages
LOG_BYTES = 8 << 20  # the log file stops growing here


class InstallError(RuntimeError):
    """The SGLang virtualenv could not be built; the message ends with pip's last line."""


# --------------------------------------------------------------------------- the virtualenv
def venv_dir(version: str = SGLANG_VERSION) -> Path:
    root = Path(os.environ.get("SAPO_SGLANG_VENV_ROOT", Path.home() / ".cache" / "sapo_megatron"))
    return root / f"sglang-{version}"


def venv_python(version: str = SGLANG_VERSION) -> Path:
    return venv_dir(version) / "bin" / "python"


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip() and not line.startswith("WARNING: Location")]
    return lines[-1] if lines else "(no output)"


def _server_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    # The kernel stand-in first; the repo root makes sapo_sglang (the delta loader) importable
    # without installing it in SGLang's venv (sapo_sglang imports neither sapo_megatron nor megatron).
    env.update(PYTHONPATH=f"{STANDIN}{os.pathsep}{REPO}", SGLANG_USE_CPU_ENGINE="1", CUDA_VISIBLE_DEVICES="",
               OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"), TOKENIZERS_PARALLELISM="false")
    env.update(extra or {})
    return env


def ensure_venv(version: str = SGLANG_VERSION, *, log=print) -> Path:
    """The SGLang virtualenv's python, built if missing (under a file lock, so parallel sessions
    build it once). Marked ready only after ``import sglang`` succeeds with the stand-in."""
    target = venv_dir(version)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f"sglang-{version}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        marker = target / READY
        if marker.exists() and marker.read_text().strip() == version and venv_python(version).exists():
            return venv_python(version)
        started = time.monotonic()
        check = [str(venv_python(version)), "-c", "import sglang, sglang.launch_server; print(sglang.__version__)"]
        if venv_python(version).exists() and _succeeds(check, version):  # installed by hand, or marker lost
            marker.write_text(version)
            return venv_python(version)
        log(f"building the SGLang {version} virtualenv in {target} (once per machine; several minutes)")
        steps = [
            [sys.executable, "-m", "venv", "--clear", str(target)],
            [str(venv_python(version)), "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-cache-dir",
             f"sglang=={version}"],
            check,
        ]
        for step in steps:
            try:
                done = subprocess.run(step, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S,
                                      env=_server_env() if "-c" in step else None)
            except subprocess.TimeoutExpired:
                raise InstallError(f"{' '.join(step[:4])} ... took over {INSTALL_TIMEOUT_S} s") from None
            if done.returncode != 0:
                raise InstallError(f"{' '.join(step[:5])} failed (exit {done.returncode}): "
                                   f"{_last_line(done.stderr or done.stdout)}")
        marker.write_text(version)
        log(f"SGLang {version} virtualenv ready in {time.monotonic() - started:.0f} s")
        return venv_python(version)


def _succeeds(command: list[str], version: str) -> bool:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=_server_env())
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0 and done.stdout.strip() == version


# --------------------------------------------------------------------------- the tiny model
TINY_CONFIG = dict(
    vocab_size=384, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, intermediate_size=128, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
    mlp_only_layers=[], norm_topk_prob=True, rope_theta=1e6, rms_norm_eps=1e-6,
    max_position_embeddings=1024, tie_word_embeddings=False,
)


def _corpus() -> list[str]:
    """Local text for the tokenizer: the math task's own prompts' vocabulary, made up here."""
    words = ("what is the sum of and the product of minus plus times divided by answer question "
             "solve for x if then find compute value equation number total each has how many more "
             "less than half twice three four five six seven eight nine ten").split()
    lines = []
    for i in range(400):
        a, b = (i * 37) % 1000, (i * 91) % 100
        lines.append(f"{words[i % len(words)]} {a} + {b} = {a + b}. {words[(i * 7) % len(words)]} "
                     f"{a} * {b % 10} = {a * (b % 10)}; \\boxed{{{a - b}}} #### {a // 3}")
    return lines


def write_sum_prompts(path: Path, n: int = 32) -> Path:
    """``n`` made-up sums as a GSM8K-format jsonl (``question``, ``answer`` ending ``#### N``),
    for the ``math`` task with the tiny model's tokenizer."""
    with open(path, "w") as f:
        for i in range(n):
            a, b = 3 + 7 * i, 11 + i
            f.write(json.dumps({"question": f"what is {a} + {b}?", "answer": f"{a} + {b} = {a + b}\n#### {a + b}"}) + "\n")
    return Path(path)


def make_tiny_model(out_dir: Path, *, seed: int = 0, dtype: str = "bfloat16") -> Path:
    """A random Qwen3-MoE (2 MoE layers, 4 experts top-2, hidden 64, vocab 384) and its BPE
    tokenizer, saved with ``save_pretrained`` in ``dtype`` (the served dtype)."""
    import torch
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists() and (out_dir / "tokenizer.json").exists():
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_CONFIG["vocab_size"], special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(_corpus(), trainer)
    if bpe.get_vocab_size() > TINY_CONFIG["vocab_size"]:
        raise RuntimeError(f"tokenizer vocabulary {bpe.get_vocab_size()} exceeds {TINY_CONFIG['vocab_size']}")
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                      bos_token=None)
    fast.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    fast.save_pretrained(str(out_dir))

    torch.manual_seed(seed)
    eos, pad = fast.convert_tokens_to_ids("<|im_end|>"), fast.convert_tokens_to_ids("<|endoftext|>")
    config = tf.Qwen3MoeConfig(**TINY_CONFIG, eos_token_id=eos, pad_token_id=pad, bos_token_id=None)
    model = tf.Qwen3MoeForCausalLM(config).to(getattr(torch, dtype))
    model.generation_config.eos_token_id = eos
    model.save_pretrained(str(out_dir))
    return out_dir


# --------------------------------------------------------------------------- one server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str, path: str, payload: dict | None = None, *, timeout: float = 60.0,
              key: str | None = None) -> tuple[int, object]:
    """One exchange on a FRESH connection (the harness never pools): ``(status, json or text)``."""
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url + path, data=data, method="GET" if payload is None else "POST",
                                     headers={"Content-Type": "application/json"})
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode("utf-8", "replace")


# The endpoints of SGLang 0.5.23 our tools call that take only the admin key when the server has one
# (``@auth_level(AuthLevel.ADMIN_OPTIONAL)`` in srt/entrypoints/http_server.py).
ADMIN_PATHS = frozenset({
    "/flush_cache", "/update_weights_from_disk", "/init_weights_update_group", "/destroy_weights_update_group",
    "/update_weights_from_tensor", "/begin_weight_update", "/end_weight_update", "/update_weights_from_distributed",
    "/update_weight_version", "/weights_checker", "/abort_request", "/pause_generation", "/continue_generation",
})


class RealServer:
    """``python -m sglang.launch_server`` for ``model_dir`` on 127.0.0.1.

    ``args`` are extra launch flags (``--api-key``, ``--tp-size 2``, ``--dtype float32``);
    ``env`` extra environment (``SGLANG_TIMEOUT_KEEP_ALIVE``). The process runs in its own
    session, so :meth:`stop` and :meth:`kill` reach the scheduler and detokenizer as well."""

    def __init__(self, python: Path, model_dir: Path, *, port: int | None = None, args: tuple[str, ...] = (),
                 env: dict[str, str] | None = None, log_dir: Path | None = None,
                 api_key: str | None = None, admin_key: str | None = None) -> None:
        self.python, self.model_dir = Path(python), Path(model_dir)
        self.port = port or free_port()
        self.args, self.env = tuple(args), dict(env or {})
        self.api_key, self.admin_key = api_key, admin_key
        self.log_path = Path(log_dir or model_dir.parent) / f"sglang-{self.port}.log"
        self.proc: subprocess.Popen | None = None
        self._tail: collections.deque[str] = collections.deque(maxlen=LOG_LINES)
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [str(self.python), "-m", "sglang.launch_server", "--model-path", str(self.model_dir),
                "--device", "cpu", "--host", "127.0.0.1", "--port", str(self.port),
                "--attention-backend", "torch_native", "--enable-return-routed-experts",
                "--skip-server-warmup", "--max-total-tokens", "4096", "--mem-fraction-static", "0.1",
                "--log-level", "warning", "--sleep-on-idle", *self.args]

    def start(self, *, wait_s: float = 240.0, wait: bool = True) -> "RealServer":
        """Launch; with ``wait`` (default) return once ``/health`` answers. ``wait=False`` lets
        several servers start at once (then :meth:`wait_healthy` each)."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        self._tail.clear()
        self.proc = subprocess.Popen(self.command(), env=_server_env(self.env), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                     text=True, errors="replace")
        self.starts += 1
        threading.Thread(target=self._pump, args=(self.proc,), daemon=True).start()
        if wait:
            self.wait_healthy(wait_s)
        return self

    def _pump(self, proc: subprocess.Popen) -> None:
        written = 0
        with open(self.log_path, "a") as log:
            for line in proc.stdout:
                self._tail.append(line.rstrip())
                if written < LOG_BYTES:
                    log.write(line)
                    written += len(line)

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(list(self._tail)[-lines:])

    def wait_healthy(self, wait_s: float) -> None:
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            proc = self.proc
            if proc is None:  # stopped by another thread meanwhile
                raise RuntimeError(f"SGLang server on port {self.port} was stopped while starting")
            if proc.poll() is not None:
                raise RuntimeError(f"SGLang server on port {self.port} exited with {proc.returncode} while "
                                   f"starting:\n{self.log_tail()}")
            with contextlib.suppress(OSError):
                if http_json(self.url, "/health", timeout=5)[0] == 200:
                    return
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"SGLang server on port {self.port} not healthy after {wait_s:.0f} s:\n{self.log_tail()}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM to the server's process group, SIGKILL after ``grace_s``."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                pass
        self._signal(signal.SIGKILL)  # children that outlive the main process
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL the whole group at once: a crashed server, as the failure tests want."""
        if self.proc is not None:
            self._signal(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
            self.proc = None

    def call(self, path: str, payload: dict | None = None, *, timeout: float = 120.0):
        """One request with the key SGLang wants there: the admin key on its admin endpoints
        (``auth_level(ADMIN_OPTIONAL)``, when the server has one), else the API key."""
        admin = path in ADMIN_PATHS and self.admin_key
        return http_json(self.url, path, payload, timeout=timeout, key=self.admin_key if admin else self.api_key)

    def reset(self) -> None:
        """Back to the launch state between tests, without a restart: any weight-update session
        closed, the base weights reloaded from disk (weight version "default"), the cache flushed."""
        if not self.alive():
            self.start()
            return
        self.wait_healthy(240.0)  # a server still starting (a test's restart) answers once up
        self.call("/end_weight_update", {})  # "not open" is fine
        status, answer = self.call("/update_weights_from_disk", {"model_path": str(self.model_dir),
                                                                 "weight_version": "default", "flush_cache": True})
        if status != 200 or not (isinstance(answer, dict) and answer.get("success")):
            raise RuntimeError(f"resetting SGLang server {self.url} failed (HTTP {status}): {answer}")

    def checksum(self) -> object:
        """``/weights_checker`` ``{"action": "checksum"}``: per-engine checksums of the served weights."""
        status, answer = self.call("/weights_checker", {"action": "checksum"})
        if status != 200:
            raise RuntimeError(f"/weights_checker on {self.url} answered HTTP {status}: {answer}")
        return answer


def remove_venv(version: str = SGLANG_VERSION) -> None:
    """For a clean rebuild (tools, never the tests)."""
    shutil.rmtree(venv_dir(version), ignore_errors=True)
