"""`mobilevlm-mlc chat`: a scripted session through a pipe, checked against the engine's own greedy
answers for the same turns, and a session on a pseudo-terminal where Ctrl-C stops an answer and the
conversation goes on."""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import subprocess
import sys
import time

from mobilevlm_mlc.demo import DEMO_IMAGE
from mobilevlm_mlc.runtime.sampling import GenerationConfig

STATS = re.compile(
    r"\[stats\] prefill (\d+) tokens, [\d.]+ tok/s; decode (\d+) tokens, [\d.]+ tok/s; KV cache (\d+) tokens in use"
)


def chat_command(built, *flags: str) -> list[str]:
    return [sys.executable, "-m", "mobilevlm_mlc.cli", "chat", str(built.dist), "--lib", str(built.lib), *flags]


def test_a_piped_session_answers_as_the_engine_does(ldpnet_built, ldpnet_engine):
    script = [
        "Hello",
        f"/image {DEMO_IMAGE}",
        "What is in the image?",
        "/stats",
        "/bogus",
        "/set top_p=0",
        "/set temperature=warm",
        "/image /no/such.png",
        "Look: <image>",
        "/reset",
        "Name a colour.",
        "/exit",
        "never read",
    ]
    proc = subprocess.run(
        chat_command(ldpnet_built, "--max-new-tokens", "8"),
        input="\n".join(script) + "\n",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    config = GenerationConfig(max_new_tokens=8)
    with ldpnet_engine.chat() as session:
        first = "".join(session.send("Hello", None, config))
        second = "".join(session.send("What is in the image?", DEMO_IMAGE, config))
        prefilled, kv_tokens = session.last.prefill_tokens, session.length
    with ldpnet_engine.chat() as session:
        third = "".join(session.send("Name a colour.", None, config))
    stats = STATS.search(proc.stdout)
    assert stats, proc.stdout
    assert proc.stdout == f"{first}\n{second}\n{stats.group(0)}\n{third}\n"
    assert (int(stats[1]), int(stats[2]), int(stats[3])) == (prefilled, 7, kv_tokens)
    assert prefilled > ldpnet_engine.dist.config.num_image_tokens  # the image went with the second message
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: /bogus: unknown command (/help lists them)",
        "error: top_p is 0.0, expected a number in (0, 1]",
        "error: /set temperature=warm: expected a number",
        "error: /no/such.png: image not found",
        "error: the message may not hold '<image>': attach images with /image PATH",
    ]
    assert "Traceback" not in proc.stderr


def read_until(fd: int, pattern: str, seconds: float = 60) -> str:
    """What the terminal shows until `pattern` (a regex) appears in it."""
    seen, deadline = "", time.monotonic() + seconds
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                seen += os.read(fd, 4096).decode(errors="replace")
            except OSError:
                break
            if re.search(pattern, seen):
                return seen
    raise AssertionError(f"{pattern!r} did not appear; the terminal showed:\n{seen[-2000:]}")


def exit_code_after_ctrl_c(pid: int, fd: int, seconds: float = 30) -> tuple[int | None, str]:
    """Ctrl-C at the prompt, then the child's exit code (None if it did not leave in time) and what the
    terminal showed. A SIGINT that lands after `input` printed the prompt but before readline's select()
    began waits in CPython's signal flag until the next one, so the key is pressed again each second, as
    a person would, until the chat answers with a new line (it left the prompt) — never while it shuts
    down, which a second SIGINT would interrupt. The terminal is read all along: the child never blocks
    writing to it."""
    deadline, seen, pressed = time.monotonic() + seconds, "", -1.0
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status), seen
        if "\n" not in seen and time.monotonic() - pressed >= 1:
            os.write(fd, b"\x03")
            pressed = time.monotonic()
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            try:
                seen += os.read(fd, 4096).decode(errors="replace")
            except OSError:  # the child closed the terminal: it is leaving
                pass
    return None, seen


def signal_state(pid: int) -> str:
    """A process's blocked, ignored and caught signals, as /proc shows them (for a failure's message)."""
    try:
        status = open(f"/proc/{pid}/status").read()
    except OSError:
        return "(gone)"
    return " ".join(line for line in status.splitlines() if line.startswith(("SigBlk", "SigIgn", "SigCgt")))


def test_ctrl_c_stops_an_answer_and_keeps_the_conversation(ldpnet_built):
    pid, fd = pty.fork()
    if pid == 0:  # the child: the chat on this pseudo-terminal, its controlling terminal
        # as a shell starts it: no signal blocked or ignored (a blocked SIGINT would survive the exec, and
        # the test-runner's process this is forked from may block one)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.execv(sys.executable, chat_command(ldpnet_built, "--max-new-tokens", "1000"))
    try:
        read_until(fd, r">>> $")
        os.write(fd, b"Tell me a very long story.\n")
        read_until(fd, r"story\.\r?\n[^>]{40}")  # the answer has begun streaming
        os.write(fd, b"\x03")  # Ctrl-C, as the terminal sends it
        shown = read_until(fd, r"\[answer stopped\][\s\S]*>>> $")
        os.write(fd, b"/stats\n")
        shown = read_until(fd, r"\[stats\][^\n]*\n[\s\S]*>>> $")
        stats = STATS.search(shown)
        assert stats and 0 < int(stats[2]) < 999, shown  # stopped well before its 1000 tokens
        kv_after_stop = int(stats[3])
        os.write(fd, b"And then?\n")
        read_until(fd, r"then\?\r?\n[\s\S]+>>> $", seconds=120)
        os.write(fd, b"/stats\n")
        stats = STATS.search(read_until(fd, r"\[stats\][^\n]*\n[\s\S]*>>> $"))
        assert int(stats[3]) > kv_after_stop  # the second turn went on the same conversation
        code, shown = exit_code_after_ctrl_c(pid, fd)
        assert code == 0, (shown, signal_state(pid))  # Ctrl-C at the prompt leaves
        pid = 0
    finally:
        if pid:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        os.close(fd)
