"""One process's failure stops every process of a launch, with the same message and exit code.

A failure seen by one process only — an exception, a full disk on the writer, a missing file — must not
leave the others blocked in their next collective until the backend's timeout (NCCL: minutes, gloo:
30 min), nor end them with unrelated messages. The failing process publishes its one-line message and
exit code in the launch's key-value store (the c10d store of the process group: torchrun's) and waits
a few seconds (`ACK_WAIT_S`) for every other process to print it. A watcher thread in each process
polls the store every `POLL_S` seconds, prints the same line and exits with the same code, even while
its main thread is blocked inside a collective. When several processes fail at once the first one
published wins, so every process prints one and the same line. Decisions every process takes from
shared values (training's non-finite steps and signals, training/train.py) end the same way.

The CLI wires it in (cli/base.py `handle_errors`): `watch_failures` when a command starts, `stop_together`
when it fails. With one process both do nothing. This module does not import torch until a process
group exists (the CLI answers bad arguments before importing torch).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


POLL_S = 0.25  # how often each process looks for a published failure
ACK_WAIT_S = 10.0  # how long a failing process waits for the others to print its message


class _Channel:
    """The store keys of one launch: `stop` = {"code", "text"} of the first failure, `acks` = how many
    processes have printed it."""

    def __init__(self, store, rank: int, world: int):
        self.store, self.rank, self.world = store, rank, world
        self.lock = threading.Lock()
        self.reporting = False  # a thread of this process has taken on printing the message (once)
        self.done = threading.Event()

    def claim(self) -> bool:
        with self.lock:
            taken, self.reporting = self.reporting, True
        return not taken

    def publish(self, code: int, text: str) -> tuple[int, str]:
        """The first failure's (code, text): this one's unless another process published first."""
        mine = json.dumps({"code": code, "text": text, "rank": self.rank})
        first = json.loads(self.store.compare_set("stop", "", mine))
        return int(first["code"]), str(first["text"])

    def ack_and_wait(self, wait: bool) -> None:
        acks = self.store.add("acks", 1)
        deadline = time.monotonic() + ACK_WAIT_S
        while wait and acks < self.world and time.monotonic() < deadline:
            time.sleep(0.05)
            acks = self.store.add("acks", 0)

    def watch(self) -> None:
        while not self.done.wait(POLL_S):
            try:
                if not self.store.check(["stop"]):
                    continue
                first = json.loads(self.store.get("stop"))
            except Exception:  # the store is gone (its host exited): the launcher stops this process
                return
            if not self.claim():  # the main thread is reporting (stop_together)
                return
            _print_line(first["text"])
            try:
                self.ack_and_wait(wait=False)
            finally:
                os._exit(int(first["code"]))  # the main thread may be blocked inside a collective


_channel: _Channel | None = None
_attach = threading.Lock()


def _print_line(text: str) -> None:
    sys.stdout.flush()
    print(text, file=sys.stderr, flush=True)


def _get_channel() -> _Channel | None:
    """This process's channel, made once the process group exists (None before, or with one process)."""
    global _channel
    if _channel is not None or world_size() <= 1 or "torch.distributed" not in sys.modules:
        return _channel
    import torch.distributed as td

    with _attach:
        if _channel is None and td.is_available() and td.is_initialized():
            try:
                from torch.distributed.distributed_c10d import _get_default_store
            except ImportError:  # a torch without it: no watcher; a failing rank's launcher stops the others
                return None
            restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")  # torchrun restarts reuse the store
            store = td.PrefixStore(f"ddaepp-stop/{restart}", _get_default_store())
            _channel = _Channel(store, td.get_rank(), td.get_world_size())
    return _channel


def watch_failures() -> None:
    """Start the watcher (module doc) of this process of a launch with several processes: a daemon thread
    that attaches once the process group exists (commands create it themselves, through accelerate) and
    stops at a normal exit. Idempotent."""
    if world_size() <= 1 or getattr(watch_failures, "started", False):
        return
    watch_failures.started = True

    def attach() -> None:
        while (channel := _get_channel()) is None:
            time.sleep(POLL_S)
        import atexit

        atexit.register(channel.done.set)
        channel.watch()

    threading.Thread(target=attach, name="ddaepp-stop-watcher", daemon=True).start()


def close_launch() -> None:
    """A command that returned normally, in a launch with several processes: stop the watcher, wait for the
    others (a process whose peer failed meanwhile is stopped there by its watcher, with the agreed line and
    code), then destroy the process group. Left to the interpreter's exit, gloo's and NCCL's C++ threads
    can be torn down while still joinable: the process aborts ("terminate called without an active
    exception", exit -6) after its work is done, and the launcher reports the launch as failed."""
    if world_size() <= 1 or "torch.distributed" not in sys.modules:
        return
    import torch.distributed as td

    if not (td.is_available() and td.is_initialized()):
        return
    try:
        td.barrier()
    finally:
        if _channel is not None:
            _channel.done.set()
        td.destroy_process_group()


def stop_together(code: int, text: str, *, wait: bool = True) -> tuple[int, str] | None:
    """Main thread of a failing process of a launch: publish (code, text) unless another process's failure
    came first, print the first one's text and return its (code, text) to exit with, after the others
    printed it too (at most ACK_WAIT_S; `wait=False` when they cannot: a lost peer). None with one process
    or no watcher: the caller prints as before."""
    channel = _get_channel()
    if channel is None:
        return None
    if not channel.claim():  # the watcher is already printing another process's failure and exiting
        threading.Event().wait()
    for sig in (signal.SIGTERM, signal.SIGINT):  # the launcher stops the others as soon as one exits:
        try:  # this process exits with the agreed code, not killed halfway by that signal
            signal.signal(sig, signal.SIG_IGN)
        except ValueError:  # not the main thread
            pass
    try:
        code, text = channel.publish(code, text)
    except Exception:  # the store is gone: report this process's own failure
        _print_line(text)
        return code, text
    _print_line(text)
    try:
        channel.ack_and_wait(wait)
    except Exception:
        pass
    return code, text


def lost_peer(exc: BaseException) -> bool:
    """Whether `exc` says another process of the launch went away (a collective's connection closed:
    torch raises RuntimeError or its subclass DistError)."""
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(s in text for s in (
        "Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted",
        "remote process exited"))
