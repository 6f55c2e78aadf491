from linprobe.cli import entry

entry()
