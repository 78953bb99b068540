import sys

from engine.main import main

if __name__ == "__main__":
    sys.exit(main())
