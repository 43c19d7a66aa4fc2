from dsc.cli import entry

entry()
