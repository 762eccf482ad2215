"""``python -m metaleg.watcher``: the watcher process (started by the supervisor)."""

from metaleg.watcher.main import main

main()
