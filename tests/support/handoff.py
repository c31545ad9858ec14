"""Connects to the daemon's workload socket, then hands the connection to the test over
SCM_RIGHTS on the control socket.

mode "exit": the connecting process forks; it exits at once, and the grandchild (which
  keeps the connection) waits until its parent is gone before handing the connection on.
  The daemon saw the pid of the process that exited: it must issue nothing.
mode "stay": the connecting process stays alive while the test uses the connection.
mode "drop": the connecting process (root) switches to nobody (65534) after connecting,
  then stays alive while the test uses the connection. SO_PEERCRED still says root: the
  daemon must see the switch and issue nothing.
"""
import os
import socket
import sys
import time

daemon_path, control_path, mode = sys.argv[1], sys.argv[2], sys.argv[3]
conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
conn.connect(daemon_path)
control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
control.connect(control_path)

if mode == "exit":
    connector = os.getpid()
    if os.fork() == 0:
        deadline = time.time() + 10
        while os.getppid() == connector and time.time() < deadline:
            time.sleep(0.01)
        socket.send_fds(control, [b"x"], [conn.fileno()])
        control.recv(1)
        os._exit(0)
    os._exit(0)

if mode == "drop":
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)

socket.send_fds(control, [b"x"], [conn.fileno()])
control.recv(1)
