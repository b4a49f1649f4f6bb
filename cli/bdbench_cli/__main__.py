"""``python -m bdbench_cli`` is ``bdrun``."""
from bdbench_cli.main import main

main()
