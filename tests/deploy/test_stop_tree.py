"""``stop_tree`` ends every process a server started, including one in a session of its
own (as flower-superexec is) whose parent a Ctrl-C already ended."""

import os
import signal
import subprocess
import time

from fedtune.deploy.server import process_tree, stop_tree


def _running(processes):
    return [p.pid for p in processes if p.is_running() and p.status() != "zombie"]


def test_a_detached_grandchild_is_stopped_with_its_tree():
    parent = subprocess.Popen(["bash", "-c", "setsid sleep 300 & sleep 300"])
    time.sleep(0.5)
    tree = process_tree(parent)
    assert len(tree) == 3
    stop_tree(parent, grace=5)
    assert _running(tree) == []


def test_an_orphan_of_the_last_poll_is_stopped_too():
    parent = subprocess.Popen(["bash", "-c", "setsid sleep 300 & sleep 300"])
    time.sleep(0.5)
    known = process_tree(parent)
    os.kill(parent.pid, signal.SIGKILL)  # the SuperLink ended first: its child is orphaned
    parent.wait()
    stop_tree(parent, grace=5, known=known)
    assert _running(known) == []
