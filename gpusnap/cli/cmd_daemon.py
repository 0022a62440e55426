import click

DEFAULT_SOCKET = "/run/gpusnap/gpusnapd.sock"


@click.command("daemon")
@click.option("--socket", "socket_path", default=DEFAULT_SOCKET, show_default=True,
              type=click.Path(dir_okay=False), help="Unix socket to serve the API on.")
@click.option("--group", help="Members of this group may run read-only queries (ls, inspect, "
              "status); the socket becomes 0660 root:GROUP. Default: root only (0600).")
@click.option("--metrics-port", type=int, help="Serve Prometheus metrics on this TCP port (off by default).")
@click.option("--metrics-host", default="127.0.0.1", show_default=True, help="Address for --metrics-port.")
@click.pass_obj
def command(app, socket_path, group, metrics_port, metrics_host):
    """Run gpusnapd in the foreground: dump, restore, warm and queries over a JSON API on
    a unix socket, each operation through the same engine as the CLI, in a forked child
    (a client that disconnects, or SIGTERM to the daemon, interrupts it: its undo runs).

    The CLI uses it when GPUSNAP_SOCKET (or the config file's `socket:`) names its socket.
    Logs: JSON lines on stderr.
    """
    from ..daemon import api, server
    server.serve(server.Config(socket=socket_path, store=api.Store(app.store, app.key_file),
                               group=group, metrics_port=metrics_port, metrics_host=metrics_host))
