from pixelray.cli import app

app(prog_name="pixelray")
