import sys

from .allocator import keep_freed_memory

if __name__ == "__main__":
    keep_freed_memory()  # this process is ours alone (command line, Slicer worker): see allocator.py
    from .cli import main

    sys.exit(main())
