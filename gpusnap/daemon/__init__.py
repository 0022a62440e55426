"""gpusnapd: a resident service with a JSON API over HTTP on a unix socket, running
operations through the same engine as the CLI (server.py: the API; ops.py: one forked
child per operation; api.py: what each request does; client.py: the client the CLI
uses when GPUSNAP_SOCKET names a daemon that answers)."""
