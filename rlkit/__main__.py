from rlkit.cli import app

app()
