"""guestfwd helper: QEMU runs this once per guest connection (`cmd:`), with the connection on
stdin/stdout; it relays to a TCP port on the host's loopback. Usage: relay.py PORT"""

import os
import select
import socket
import sys

sock = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
fds = [0, sock.fileno()]
while fds:
    ready, _, _ = select.select(fds, [], [])
    for fd in ready:
        data = os.read(fd, 65536)
        if fd == 0:
            if data:
                sock.sendall(data)
            else:
                sock.shutdown(socket.SHUT_WR)
                fds.remove(0)
        elif data:
            os.write(1, data)
        else:
            sys.exit(0)
