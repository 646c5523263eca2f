from serving.cli import app

app(prog_name="hotspots")
