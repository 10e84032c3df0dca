from dmhpc.cli import run

run()
