import click


@click.group("key")
def command():
    """Key files for encrypted stores (global option --key-file, env GPUSNAP_KEY_FILE)."""


@command.command("generate")
@click.argument("file", type=click.Path(dir_okay=False))
@click.pass_obj
def generate(app, file):
    """Write a new random 256-bit key to FILE (mode 0600; an existing FILE is kept).

    A store created with `--key-file FILE` is encrypted with it (AES-256-GCM) and opens
    only with it: keep a copy elsewhere, a lost key is a lost store.
    """
    from ..store import keyfile
    fingerprint = keyfile.generate(file)
    app.emit({"file": file, "fingerprint": fingerprint}, f"wrote a new key to {file} "
             f"(fingerprint {fingerprint})")
