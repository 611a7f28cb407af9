"""An inline echo server with a ring of RING_SLOTS slots, for measure.sh:
``ringsrv.py RING_SLOTS`` prints ``ready PORT`` and serves until SIGTERM."""

import sys

import rsepoll


class Echo(rsepoll.Server):
    def on_message_received(self, conn, data):
        self.send_message(conn, data)


server = Echo(io_threads=0, ring_slots=int(sys.argv[1]))
listener = rsepoll.make_listener_socket(0, "127.0.0.1")
server.register_listener_socket(listener)
print("ready", listener.port, flush=True)
server.listen()
