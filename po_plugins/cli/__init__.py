"""The command-line tools: one console command, `po-plugins <command>` (po_plugins/cli/main.py), and the same
commands as `python -m po_plugins.cli.<module>` modules (which launchers such as `deepspeed --module` need)."""
