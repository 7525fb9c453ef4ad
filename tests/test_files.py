"""fasdiff_jax.files: atomic writes and the removal of what killed writers left."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

from fasdiff_jax import files


def dead_pid() -> int:
    """The pid of a process that has ended (as a ``kill -9``-ed writer's)."""
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


def test_stale_temps_of_dead_writers_go_and_live_ones_stay(tmp_path, monkeypatch):
    """A killed writer's ``NAME.tmp-PID`` (a file, or a folder for an export) was never
    removed, and each kill added another; a live writer's, another output's, a young one
    where writers on other machines may share the folder, and other files stay."""
    dead = dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        host = files.temp_name("a.fsd").split(".tmp-")[1].rsplit("-", 1)[0]
        assert files.temp_name("a.fsd") == f"a.fsd.tmp-{host}-{os.getpid()}"
        names = {f"a.fsd.tmp-{host}-{dead}": "removed", f"a.fsd.tmp-{dead}": "removed (older)",
                 f"a.fsd.tmp{dead}": "removed (older name)",
                 f"a.fsd.tmp-elsewhere-{dead}": "another machine's (NFS)",
                 f"a.fsd.tmp-{live.pid}": "its writer runs", f"a.fsd.tmp-{os.getpid()}": "ours",
                 f"b.fsd.tmp-{dead}": "another output", "a.fsd": "the output",
                 "a.fsd.tmp-x": "not a pid", f"a.fsd.tmp-{10**30}": "removed (no such pid)"}
        if files._BOOT:  # Linux: the boot id tells a reused pid after a reboot
            machine, boot = host.rsplit("@", 1)
            assert boot == files._BOOT and machine == socket.gethostname().replace(os.sep, "_")
            earlier = "0" * 8 if boot != "0" * 8 else "1" * 8
            names |= {f"a.fsd.tmp-{machine}@{earlier}-{live.pid}": "written since this boot",
                      f"a.fsd.tmp-{machine}-{live.pid}": "its writer runs (no boot id)",
                      f"a.fsd.tmp-elsewhere@{earlier}-{dead}": "another machine's"}
        for name in names:
            (tmp_path / name).write_bytes(b"x")
            if names[name] == "written since this boot":  # a same-named machine's (NFS)
                os.utime(tmp_path / name, (files._boot_time() - 60,) * 2)  # (renamed: old)
        (tmp_path / f"exp.tmp-{host}-{dead}" / "checkpoints").mkdir(parents=True)
        removed = files.remove_stale_temps(str(tmp_path), {"a.fsd", "exp"})
        gone = ({n for n, why in names.items() if why.startswith("removed")}
                | {f"exp.tmp-{host}-{dead}"})
        assert sorted(removed) == sorted(str(tmp_path / n) for n in gone)
        assert sorted(os.listdir(tmp_path)) == sorted(set(names) - gone)
        if files._BOOT:  # this machine rebooted since they were written: an earlier boot's
            monkeypatch.setattr(files, "_boot_time", lambda: time.time() + 60)  # temp goes,
            since = [n for n, why in names.items() if why == "written since this boot"]
            assert files.remove_stale_temps(str(tmp_path), {"a.fsd"}) == [
                str(tmp_path / n) for n in since]  # though its pid now runs another process

        young = tmp_path / f"b.fsd.tmp-{dead}"
        assert files.remove_stale_temps(str(tmp_path), {"b.fsd"}, min_age_s=60) == []
        os.utime(young, (time.time() - 120,) * 2)
        assert files.remove_stale_temps(str(tmp_path), {"b.fsd"}, min_age_s=60) == [str(young)]
    finally:
        live.kill()
        live.wait()
    assert files.remove_stale_temps(str(tmp_path / "missing"), {"a"}) == []
